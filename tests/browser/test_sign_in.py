"""Sign-in, sign-out and password change in a real browser, on a whole stack: the forms as a person uses them
(labels, typing, buttons, the keyboard alone), the pages' accessibility (axe-core) at a laptop's and a phone's
width, and a visible focus on every control reached with Tab."""
from __future__ import annotations

import re

import pytest

from services.api.console.routes import SIGN_IN_REFUSED
from tests.browser.conftest import DESKTOP, PASSWORD, VIEWPORTS, sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
expect = pytest.importorskip("playwright.async_api", reason="browser tests: playwright is not installed").expect

NEW_PASSWORD = "a different pass phrase"
HOME = re.compile(r"/console/$")
SIGN_IN = re.compile(r"/console/sign-in$")


async def test_sign_in_lands_on_the_home_page_naming_the_user_and_role(signed_in_page, users):
    page = await signed_in_page("campaigner")
    await expect(page).to_have_url(HOME)
    main = page.get_by_role("main")
    await expect(main.locator(".username")).to_have_text(users["campaigner"])
    await expect(main.locator(".role")).to_have_text("campaigner")
    await expect(main.get_by_text(f"user:{users['campaigner']}")).to_be_visible()
    await expect(page).to_have_title(re.compile("Outreach console"))


async def test_a_wrong_password_is_refused_with_the_one_generic_message(new_page, make_user):
    username = make_user("campaigner")  # its own: the failures count towards its sign-in throttle
    page = await new_page()
    await sign_in(page, username, "not the pass phrase")
    await expect(page.get_by_role("alert")).to_have_text(SIGN_IN_REFUSED)
    await expect(page.get_by_label("Username")).to_have_value(username)  # typed once, kept
    await expect(page.get_by_label("Password")).to_have_value("")
    await page.goto("/console/")
    await expect(page).to_have_url(SIGN_IN)  # no session


async def test_signing_out_ends_the_session(signed_in_page):
    page = await signed_in_page("admin")
    await page.get_by_role("banner").get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(SIGN_IN)
    await page.goto("/console/password")
    await expect(page).to_have_url(SIGN_IN)
    await page.go_back()  # a page from before sign-out is not served from a cache (no-store)
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


async def test_changing_the_password_then_signing_in_with_the_new_one(signed_in_page, new_page, make_user):
    username = make_user("campaigner")  # its own: the change signs out its other sessions
    page = await signed_in_page("campaigner", username=username)
    await page.get_by_role("link", name="Password").click()
    await expect(page.get_by_role("heading", name="Change password")).to_be_visible()

    await page.get_by_label("Current password").fill("not the pass phrase")
    await page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    await page.get_by_label("New password again").fill(NEW_PASSWORD)
    await page.get_by_role("button", name="Change password").click()
    await expect(page.get_by_role("alert")).to_have_text("The current password is wrong.")

    await page.get_by_label("Current password").fill(PASSWORD)
    await page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    await page.get_by_label("New password again").fill(NEW_PASSWORD)
    await page.get_by_role("button", name="Change password").click()
    await expect(page.get_by_role("status")).to_have_text("Password changed. Your other sessions are signed out.")

    elsewhere = await new_page()
    await sign_in(elsewhere, username, PASSWORD)
    await expect(elsewhere.get_by_role("alert")).to_have_text(SIGN_IN_REFUSED)
    await sign_in(elsewhere, username, NEW_PASSWORD)
    await expect(elsewhere).to_have_url(HOME)


async def test_signing_in_with_the_keyboard_alone(new_page, users):
    page = await new_page()
    await page.goto("/console/sign-in")
    await expect(page.get_by_label("Username")).to_be_focused()  # autofocus: type at once
    await page.keyboard.type(users["org_admin"])
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Password")).to_be_focused()
    await page.keyboard.type(PASSWORD)
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(HOME)


# ---------------------------------------------------------------- accessibility and focus

@pytest.fixture(params=sorted(VIEWPORTS), ids=str)
def viewport(request) -> dict:
    return VIEWPORTS[request.param]


async def test_the_sign_in_pages_pass_axe(new_page, assert_accessible, viewport):
    page = await new_page(viewport)
    await page.goto("/console/sign-in")
    await assert_accessible(page, "the sign-in form")
    await sign_in(page, "nobody-at-all", "not the pass phrase")
    await expect(page.get_by_role("alert")).to_be_visible()
    await assert_accessible(page, "the sign-in form with its refusal")


async def test_the_signed_in_pages_pass_axe(signed_in_page, assert_accessible, viewport):
    page = await signed_in_page("org_admin", viewport)
    await assert_accessible(page, "the home page")
    await page.goto("/console/password")
    await assert_accessible(page, "the password page")
    await page.get_by_role("button", name="Change password").click()  # required fields: the browser says so
    await page.get_by_label("Current password").fill("not the pass phrase")
    await page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    await page.get_by_label("New password again").fill(NEW_PASSWORD)
    await page.get_by_role("button", name="Change password").click()
    await expect(page.get_by_role("alert")).to_be_visible()
    await assert_accessible(page, "the password page with its refusal")


async def test_nothing_is_wider_than_a_phone_screen(signed_in_page):
    page = await signed_in_page("org_admin", VIEWPORTS["375x812"])
    for path in ("/console/", "/console/password"):
        await page.goto(path)
        overflow = await page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} scrolls sideways by {overflow}px at 375px"


FOCUS_RING = """() => {
  const el = document.activeElement;
  if (!el || el === document.body) return null;
  const style = getComputedStyle(el);
  const ring = style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0;
  return {what: el.tagName.toLowerCase() + (el.name ? `[name=${el.name}]` : '') + ' ' + (el.textContent || '').trim(),
          ring: ring || style.boxShadow !== 'none'};
}"""


async def focus_walk(page, limit: int = 40) -> list[dict]:
    """Tab from the top of the page through every control once (until focus comes back round)."""
    await page.evaluate("() => document.activeElement && document.activeElement.blur()")
    seen: list[dict] = []
    for _ in range(limit):
        await page.keyboard.press("Tab")
        focused = await page.evaluate(FOCUS_RING)
        if focused is None or (seen and focused == seen[0]):
            break
        seen.append(focused)
    return seen


async def test_every_control_reached_with_tab_shows_its_focus(signed_in_page, new_page):
    anonymous = await new_page()
    await anonymous.goto("/console/sign-in")
    page = await signed_in_page("org_admin", DESKTOP)
    for where, path in ((anonymous, "/console/sign-in"), (page, "/console/"), (page, "/console/password")):
        await where.goto(path)
        walked = await focus_walk(where)
        assert walked, f"Tab reaches nothing on {path}"
        unmarked = [f["what"] for f in walked if not f["ring"]]
        assert not unmarked, f"no visible focus on {path} for: {unmarked}"
