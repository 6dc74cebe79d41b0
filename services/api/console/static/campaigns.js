// The campaigns screen's progressive enhancement (plain ES, no build step; a file of its own, as the CSP allows
// scripts from 'self' only). Without it every action is a link to its confirmation page, which works alone.
// - The action menu (⋮): each <details data-menu> becomes a menu button (the WAI-ARIA menu button pattern:
//   aria-haspopup, aria-expanded, arrow keys, Home/End, Escape closes and gives focus back).
// - Run, Stop, Retry failed, Resume and Delete open their confirmation in a modal <dialog>: the same form as the
//   page, asked with the X-Console-Fragment header, posted in place, so a refusal is read in the dialog; an
//   accepted command goes to the list the server names (X-Console-Location). Closing the dialog sends nothing.
// - Run Campaign is enabled only once the four disclaimer boxes are ticked (the server checks them too).
"use strict";

(() => {
  const FRAGMENT_HEADER = "X-Console-Fragment";
  const LOCATION_HEADER = "X-Console-Location";
  let openMenu = null; // {wrapper, button, list} of the menu that is open
  let returnFocusTo = null; // what had focus before the dialog opened

  // ------------------------------------------------------------------ the action menu

  const menuItems = (list) => Array.from(list.querySelectorAll('[role="menuitem"]'));

  function closeMenu(focusButton) {
    if (!openMenu) return;
    const { button, list } = openMenu;
    list.hidden = true;
    button.setAttribute("aria-expanded", "false");
    openMenu = null;
    if (focusButton) button.focus();
  }

  function showMenu(menu, index) {
    if (openMenu && openMenu.button !== menu.button) closeMenu(false);
    menu.list.hidden = false;
    menu.button.setAttribute("aria-expanded", "true");
    openMenu = menu;
    const items = menuItems(menu.list);
    if (items.length) items[(index + items.length) % items.length].focus();
  }

  function enhanceMenu(details) {
    const summary = details.querySelector("summary");
    const list = details.querySelector("ul");
    const label = summary.getAttribute("aria-label");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "menu-button";
    button.textContent = summary.textContent.trim();
    button.setAttribute("aria-label", label);
    button.setAttribute("aria-haspopup", "menu");
    button.setAttribute("aria-expanded", "false");
    button.setAttribute("aria-controls", list.id);
    list.setAttribute("role", "menu");
    list.setAttribute("aria-label", label);
    list.hidden = true;
    for (const item of list.children) {
      item.setAttribute("role", "none");
      const link = item.querySelector("a");
      link.setAttribute("role", "menuitem");
      link.tabIndex = -1;
    }
    const wrapper = document.createElement("div");
    wrapper.className = "menu";
    wrapper.append(button, list);
    details.replaceWith(wrapper);
    const menu = { wrapper, button, list };

    button.addEventListener("click", () => {
      if (openMenu && openMenu.button === button) closeMenu(true);
      else showMenu(menu, 0);
    });
    button.addEventListener("keydown", (event) => {
      if (event.key === "ArrowDown") {
        event.preventDefault();
        showMenu(menu, 0);
      } else if (event.key === "ArrowUp") {
        event.preventDefault();
        showMenu(menu, -1);
      }
    });
    list.addEventListener("keydown", (event) => {
      const items = menuItems(list);
      const at = items.indexOf(document.activeElement);
      const to = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: items.length - 1 }[event.key];
      if (to !== undefined) {
        event.preventDefault();
        items[(to + items.length) % items.length].focus();
      } else if (event.key === "Escape") {
        event.preventDefault();
        closeMenu(true);
      } else if (event.key === " ") {
        event.preventDefault();
        document.activeElement.click();
      } else if (event.key === "Tab") {
        closeMenu(false);
      }
    });
    list.addEventListener("click", (event) => {
      const link = event.target.closest("a[data-confirm]");
      if (!link) {
        closeMenu(false);
        return;
      }
      event.preventDefault();
      closeMenu(false);
      openConfirmation(link.href, button);
    });
    wrapper.addEventListener("focusout", (event) => {
      if (openMenu === menu && !wrapper.contains(event.relatedTarget)) closeMenu(false);
    });
  }

  document.addEventListener("click", (event) => {
    if (openMenu && !openMenu.wrapper.contains(event.target)) closeMenu(false);
  });

  // ------------------------------------------------------------------ the Run Campaign button

  function gateRun(root) {
    for (const form of root.querySelectorAll("form[data-run-form]")) {
      const boxes = Array.from(form.querySelectorAll("input[data-disclaimer]"));
      const button = form.querySelector('button[type="submit"]');
      button.disabled = !boxes.every((box) => box.checked);
      button.setAttribute("aria-describedby", "run-hint");
    }
  }

  document.addEventListener("change", (event) => {
    const form = event.target.closest && event.target.closest("form[data-run-form]");
    if (form) gateRun(form.parentElement);
  });

  // ------------------------------------------------------------------ the confirmation dialog

  function focusInDialog(dialog) {
    const target = dialog.querySelector("#confirm-error") || dialog.querySelector("input[data-disclaimer]")
      || dialog.querySelector("[data-dialog-close]");
    if (target) target.focus();
  }

  function fill(dialog, html) {
    dialog.innerHTML = html; // the server's own escaped HTML; scripts in it would not run
    gateRun(dialog);
  }

  async function openConfirmation(url, opener) {
    const dialog = document.getElementById("confirm-dialog");
    if (!dialog || typeof dialog.showModal !== "function") {
      window.location.assign(url);
      return;
    }
    let response;
    try {
      response = await fetch(url, { headers: { [FRAGMENT_HEADER]: "1" }, credentials: "same-origin" });
    } catch (error) {
      window.location.assign(url);
      return;
    }
    if (!response.ok || response.redirected) { // signed out, refused: the page itself says why
      window.location.assign(url);
      return;
    }
    fill(dialog, await response.text());
    returnFocusTo = opener;
    dialog.showModal();
    focusInDialog(dialog);
  }

  function enhanceDialog(dialog) {
    dialog.addEventListener("click", (event) => {
      if (event.target.closest("[data-dialog-close]")) {
        event.preventDefault();
        dialog.close();
      }
    });
    dialog.addEventListener("close", () => {
      dialog.replaceChildren(); // nothing stale the next time, and nothing was sent
      if (returnFocusTo) returnFocusTo.focus();
      returnFocusTo = null;
    });
    dialog.addEventListener("submit", async (event) => {
      const form = event.target.closest("form[data-confirm-form]");
      if (!form) return;
      event.preventDefault();
      const button = form.querySelector('button[type="submit"]');
      button.disabled = true;
      button.setAttribute("aria-busy", "true");
      let response;
      try {
        response = await fetch(form.action, {
          method: "POST", credentials: "same-origin", body: new URLSearchParams(new FormData(form)),
          headers: { [FRAGMENT_HEADER]: "1", "Content-Type": "application/x-www-form-urlencoded" },
        });
      } catch (error) {
        form.submit(); // the same form_key: sent twice, it is still one command
        return;
      }
      const next = response.headers.get(LOCATION_HEADER);
      if (next) {
        window.location.assign(next);
        return;
      }
      const html = await response.text();
      if (response.redirected || !html.includes("data-confirm-body")) {
        form.submit(); // not the form again (a session ended, say): the page answers in full
        return;
      }
      fill(dialog, html);
      focusInDialog(dialog);
    });
  }

  // ------------------------------------------------------------------ start

  function start() {
    document.querySelectorAll("details[data-menu]").forEach(enhanceMenu);
    const dialog = document.getElementById("confirm-dialog");
    if (dialog) enhanceDialog(dialog);
    gateRun(document);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
