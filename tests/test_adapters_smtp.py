"""SmtpAdapter against real SMTP servers started by the test (aiosmtpd; a raw socket for a 421 greeting)."""
from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import time
import uuid
from urllib.parse import parse_qsl, urlsplit

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from pydantic import SecretStr

from services.common.embedded_broker import free_port
from services.common.fence import ClaimedMessage, open_fence
from services.common.settings import Settings
from services.common.templating import render_email
from services.sender.smtp import SmtpAdapter, retries_path
from services.common.unsubscribe import verify_unsubscribe

PASSWORD = "smtp-password-SECRET-3b"
HOOKS = "https://hooks.example.com/outreach"
TEMPLATE = {"subject": "Hello {{name}}", "html": "<p>Hi {{ name }} &amp; {{missing}}</p>",
            "from_email": "team@example.com", "from_name": "The Team", "reply_to": "help@example.com",
            "attachments": []}


class Handler:
    """Answers by the recipient's local part: defer<N>... deferred N times at RCPT then taken;
    deferforever... always 451; bounce... 550 at RCPT; datadefer... 452 after DATA; datafail... 554 after DATA."""

    def __init__(self) -> None:
        self.rcpts: dict[str, int] = {}
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.peers: set = set()

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.peers.add(session.peer)
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        seen = self.rcpts[address] = self.rcpts.get(address, 0) + 1
        if local.startswith("deferforever"):
            return "451 4.7.1 Greylisted, try again later"
        if local.startswith("defer") and seen <= int(local[5]):
            return "451 4.7.1 Greylisted, try again later"
        if local.startswith("bounce"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        local = envelope.rcpt_tos[0].split("@")[0]
        if local.startswith("datadefer"):
            return "452 4.3.1 Insufficient system storage"
        if local.startswith("datafail"):
            return "554 5.6.0 Message rejected"
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok: queued"


def start_server(handler, **kwargs) -> tuple[Controller, int]:
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    return controller, port


@pytest.fixture
def smtp_server():
    handler = Handler()
    controller, port = start_server(handler)
    try:
        yield handler, port
    finally:
        controller.stop()


def settings_for(port: int, tmp_path, **extra) -> Settings:
    values = dict(smtp_host="127.0.0.1", smtp_port=port, smtp_retry_s=0.1, retry_window_s=60,
                  webhook_public_url=HOOKS, unsubscribe_secret=SecretStr("unsub-secret"), data_dir=tmp_path,
                  provider_concurrency=4)
    values.update(extra)
    return Settings(**values)


def item(destination: str, campaign_id: str, attempt: int = 0, name: str = "Ada <x>") -> dict:
    return {"message_id": str(uuid.uuid4()), "row": 2, "destination": destination, "campaign_id": campaign_id,
            "variables": {"name": name}, "attempt": attempt}


def adapter_for(settings: Settings) -> SmtpAdapter:
    return SmtpAdapter(settings, local_hostname="sender.test", connect_timeout_s=2, command_timeout_s=5)


def outcomes(results: list[dict]) -> list[tuple]:
    return [(r["outcome"], r["provider_code"], r["attempt"]) for r in results]


async def test_250_is_accepted_and_delivered(smtp_server, tmp_path):
    handler, port = smtp_server
    settings = settings_for(port, tmp_path)
    campaign_id = str(uuid.uuid4())
    adapter = adapter_for(settings)
    try:
        sent = item("ann@example.com", campaign_id, attempt=1)
        results = await adapter.submit("email", [sent], TEMPLATE)
        more = await adapter.submit("email", [item(f"u{n}@example.com", campaign_id) for n in range(3)], TEMPLATE)
        again = await adapter.submit("email", [item("last@example.com", campaign_id)], TEMPLATE)
    finally:
        await adapter.close()
    assert outcomes(results) == [("accepted", None, 2), ("delivered", None, 2)]
    assert all(r["message_id"] == sent["message_id"] for r in results)
    assert results[0]["provider_message_id"] == f"<{sent['message_id']}.2@example.com>"
    assert [r["outcome"] for r in more + again] == ["accepted", "delivered"] * 4
    assert len(handler.messages) == 5
    assert len(handler.peers) <= 3  # connections are pooled and reused, not one per message

    mail_from, rcpt_tos, content = handler.messages[0]
    assert (mail_from, rcpt_tos) == ("team@example.com", ["ann@example.com"])
    message = email.message_from_bytes(content, policy=email.policy.default)
    subject, html = render_email(TEMPLATE["subject"], TEMPLATE["html"], sent["variables"])
    assert message["Subject"] == subject == "Hello Ada <x>"
    assert message.get_content().rstrip("\r\n") == html == "<p>Hi Ada &lt;x&gt; &amp; {{missing}}</p>"
    assert message.get_content_type() == "text/html"
    assert message["From"] == "The Team <team@example.com>"
    assert message["To"] == "ann@example.com"
    assert message["Reply-To"] == "help@example.com"
    assert message["Message-ID"] == f"<{sent['message_id']}.2@example.com>"
    assert message["X-Outreach-Message-Id"] == sent["message_id"]
    assert message["X-Outreach-Campaign-Id"] == campaign_id
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = str(message["List-Unsubscribe"]).strip().strip("<>")
    parts = urlsplit(link)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{HOOKS}/unsubscribe"
    assert verify_unsubscribe(settings, dict(parse_qsl(parts.query))) == (
        campaign_id, sent["message_id"], "ann@example.com")


async def test_5xx_at_rcpt_or_data_bounces_and_4xx_at_data_defers(smtp_server, tmp_path):
    handler, port = smtp_server
    campaign_id = str(uuid.uuid4())
    adapter = adapter_for(settings_for(port, tmp_path))
    try:
        bounced, data_failed, data_deferred, fine = items = [
            item("bounce@example.com", campaign_id), item("datafail@example.com", campaign_id),
            item("datadefer@example.com", campaign_id), item("fine@example.com", campaign_id)]
        results = await adapter.submit("email", items, TEMPLATE)
        scheduled = adapter.store.scheduled()
    finally:
        await adapter.close()
    by_message = {}
    for r in results:
        by_message.setdefault(r["message_id"], []).append((r["outcome"], r["provider_code"], r["attempt"]))
    assert by_message[bounced["message_id"]] == [("bounced", "550", 1)]
    assert by_message[data_failed["message_id"]] == [("bounced", "554", 1)]
    assert by_message[data_deferred["message_id"]] == [("deferred", "452", 1)]
    assert by_message[fine["message_id"]] == [("accepted", None, 1), ("delivered", None, 1)]
    assert [row["message_id"] for row in scheduled] == [data_deferred["message_id"]]
    assert [m[1] for m in handler.messages] == [["fine@example.com"]]  # the refused connection was reset, reused


async def test_4xx_then_250_resubmitted_then_delivered(smtp_server, tmp_path):
    handler, port = smtp_server
    settings = settings_for(port, tmp_path)
    campaign_id = str(uuid.uuid4())
    adapter = adapter_for(settings)
    published: list[tuple[str, list[dict]]] = []

    async def publish(records):
        published.extend(records)

    stop = asyncio.Event()
    try:
        sent = item("defer2@example.com", campaign_id)  # deferred twice at RCPT, then taken
        first = await adapter.submit("email", [sent], TEMPLATE)
        assert outcomes(first) == [("deferred", "451", 1)]
        (row,) = adapter.store.scheduled()
        assert (row["message_id"], row["campaign_id"], row["destination"], row["attempt"]) == (
            sent["message_id"], campaign_id, "defer2@example.com", 1)
        assert row["deadline"] - row["next_at"] == pytest.approx(60 - 0.1, abs=0.01)
        assert retries_path(settings).exists()
        task = asyncio.create_task(adapter.run_retries(stop, publish))
        for _ in range(100):
            if any(r["outcome"] == "delivered" for _cid, results in published for r in results):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5)
        left = adapter.store.scheduled()
    finally:
        stop.set()
        await adapter.close()
    assert {cid for cid, _ in published} == {campaign_id}
    results = [r for _cid, results in published for r in results]
    assert outcomes(results) == [("resubmitted", "451", 2), ("deferred", "451", 2),
                                 ("resubmitted", "250", 3), ("delivered", None, 3)]
    assert all(r["message_id"] == sent["message_id"] for r in results)
    assert results[-1]["provider_message_id"] == f"<{sent['message_id']}.3@example.com>"
    assert left == []
    assert handler.rcpts["defer2@example.com"] == 3
    assert len(handler.messages) == 1


async def test_nothing_is_sent_after_the_retry_window(smtp_server, tmp_path):
    handler, port = smtp_server
    adapter = adapter_for(settings_for(port, tmp_path, retry_window_s=0.5))
    published = []

    async def publish(records):
        published.extend(records)

    stop = asyncio.Event()
    try:
        (first,) = await adapter.submit("email", [item("deferforever@example.com", str(uuid.uuid4()))], TEMPLATE)
        assert first["outcome"] == "deferred"
        task = asyncio.create_task(adapter.run_retries(stop, publish))
        await asyncio.sleep(1.0)
        count_at_window_end = handler.rcpts["deferforever@example.com"]
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(task, 5)
        left = adapter.store.scheduled()
    finally:
        stop.set()
        await adapter.close()
    assert handler.rcpts["deferforever@example.com"] == count_at_window_end  # nothing after the window
    assert 2 <= count_at_window_end <= 7  # the first submission and a few re-submissions within 0.5 s
    resubmitted = [r for _cid, results in published for r in results if r["outcome"] == "resubmitted"]
    assert len(resubmitted) == count_at_window_end - 1
    assert [r["attempt"] for r in resubmitted] == list(range(2, count_at_window_end + 1))
    assert left == []


async def test_a_failed_publish_loses_nothing(smtp_server, tmp_path):
    _handler, port = smtp_server
    adapter = adapter_for(settings_for(port, tmp_path))
    published, calls = [], []

    async def flaky_publish(records):
        calls.append(records)
        if len(calls) == 1:
            raise RuntimeError("broker down")
        published.extend(records)

    try:
        await adapter.submit("email", [item("defer1@example.com", str(uuid.uuid4()))], TEMPLATE)
        await asyncio.sleep(0.15)
        with pytest.raises(RuntimeError):
            await adapter.retry_pass(flaky_publish)
        assert adapter.store.scheduled() == []  # delivered: the row is gone, its results wait in the outbox
        await adapter.retry_pass(flaky_publish)
    finally:
        await adapter.close()
    assert [r["outcome"] for _cid, results in published for r in results] == ["resubmitted", "delivered"]


async def test_closed_port_is_presend(tmp_path):
    adapter = adapter_for(settings_for(free_port(), tmp_path))
    try:
        results = await adapter.submit("email", [item("a@example.com", str(uuid.uuid4()), attempt=2)], TEMPLATE)
        assert await adapter.probe() is False
    finally:
        await adapter.close()
    assert outcomes(results) == [("presend_error", "connect", 3)]
    assert results[0]["final"] is False


async def test_421_greeting_is_presend(tmp_path):
    async def busy(reader, writer):
        writer.write(b"421 4.3.2 Service not available, closing channel\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(busy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    adapter = adapter_for(settings_for(port, tmp_path))
    try:
        results = await adapter.submit("email", [item("a@example.com", str(uuid.uuid4()))], TEMPLATE)
        assert await adapter.probe() is False
    finally:
        await adapter.close()
        server.close()
        await server.wait_closed()
    assert outcomes(results) == [("presend_error", "421", 1)]


async def test_refused_auth_is_presend_and_the_password_stays_secret(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    handler = Handler()
    attempts = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        attempts.append(mechanism)
        ok = getattr(auth_data, "password", b"") == PASSWORD.encode()
        return AuthResult(success=ok and getattr(auth_data, "login", b"") == b"right-user", handled=False)

    controller, port = start_server(handler, authenticator=authenticator, auth_require_tls=False)
    try:
        wrong = adapter_for(settings_for(port, tmp_path, smtp_username="wrong-user",
                                         smtp_password=SecretStr(PASSWORD)))
        right = adapter_for(settings_for(port, tmp_path / "right", smtp_username="right-user",
                                         smtp_password=SecretStr(PASSWORD)))
        try:
            refused = await wrong.submit("email", [item("a@example.com", str(uuid.uuid4()))], TEMPLATE)
            taken = await right.submit("email", [item("b@example.com", str(uuid.uuid4()))], TEMPLATE)
            assert await right.probe() is True
            assert await wrong.probe() is False
        finally:
            await wrong.close()
            await right.close()
    finally:
        controller.stop()
    assert attempts  # AUTH was really exchanged
    assert outcomes(refused) == [("presend_error", "535", 1)]
    assert [r["outcome"] for r in taken] == ["accepted", "delivered"]
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("outreach"))
    assert PASSWORD not in ours + repr(refused + taken) + repr(wrong)
    assert [m[1] for m in handler.messages] == [["b@example.com"]]


async def test_no_reply_after_data_is_no_answer_and_never_resent(tmp_path):
    class Slow(Handler):
        async def handle_DATA(self, server, session, envelope):
            await asyncio.sleep(1.5)
            return await super().handle_DATA(server, session, envelope)

    handler = Slow()
    controller, port = start_server(handler)
    adapter = SmtpAdapter(settings_for(port, tmp_path), local_hostname="sender.test", data_timeout_s=0.3)
    try:
        results = await adapter.submit("email", [item("slow@example.com", str(uuid.uuid4()))], TEMPLATE)
        scheduled = adapter.store.scheduled()
    finally:
        await adapter.close()
        controller.stop()
    assert outcomes(results) == [("no_answer", None, 1)]
    assert scheduled == []


async def test_a_connection_the_server_closed_while_idle_is_replaced(tmp_path):
    handler = Handler()
    controller, port = start_server(handler, timeout=0.3)  # the server drops idle sessions after 0.3 s
    adapter = adapter_for(settings_for(port, tmp_path))
    try:
        first = await adapter.submit("email", [item("one@example.com", str(uuid.uuid4()))], TEMPLATE)
        await asyncio.sleep(0.8)
        second = await adapter.submit("email", [item("two@example.com", str(uuid.uuid4()))], TEMPLATE)
    finally:
        await adapter.close()
        controller.stop()
    assert [r["outcome"] for r in first + second] == ["accepted", "delivered"] * 2
    assert len(handler.peers) == 2


async def test_a_line_break_in_a_value_stays_out_of_the_headers(smtp_server, tmp_path):
    handler, port = smtp_server
    adapter = adapter_for(settings_for(port, tmp_path))
    try:
        results = await adapter.submit("email", [item("nl@example.com", str(uuid.uuid4()), name="Ada\r\nBcc: x@y")],
                                       TEMPLATE)
    finally:
        await adapter.close()
    assert [r["outcome"] for r in results] == ["accepted", "delivered"]
    message = email.message_from_bytes(handler.messages[0][2], policy=email.policy.default)
    assert message["Subject"] == "Hello Ada Bcc: x@y"
    assert message["Bcc"] is None


async def test_a_resubmission_interrupted_after_its_250_is_never_sent_again(smtp_server, tmp_path):
    """Re-submissions take the message through the hand-off fence: a sender that dies between a 250 and its
    bookkeeping leaves the message handed off, so the restarted one finds it due but may not send it."""
    handler, port = smtp_server
    settings = settings_for(port, tmp_path)
    fence = open_fence(settings)
    campaign_id, claim_id = str(uuid.uuid4()), str(uuid.uuid4())
    sent = {**item("defer1@example.com", campaign_id), "claim_id": claim_id}  # deferred once at RCPT
    mid = sent["message_id"]
    fence.open_claim(campaign_id=campaign_id, claim_id=claim_id, claim_version=1, deadline=time.time() + 60,
                     messages=[ClaimedMessage(mid, 0)])
    published: list[tuple[str, list[dict]]] = []

    async def publish(records):
        published.extend(records)

    first = adapter_for(settings)
    first.attach_fence(fence)
    try:
        assert fence.take(claim_id, [mid], time.time()) == {mid: 1}  # the dispatcher's, for the first call
        assert outcomes(await first.submit("email", [sent], TEMPLATE)) == [("deferred", "451", 1)]
        assert fence.row(mid)["state"] == "open"  # deferred: nothing was taken, a re-submission may go

        def killed(done):
            raise RuntimeError("the sender is killed right after the 250")

        first.store.settle = killed
        await asyncio.sleep(0.15)  # the re-submission is due after smtp_retry_s
        with pytest.raises(RuntimeError, match="killed"):
            await first.retry_pass(publish)
        assert len(handler.messages) == 1 and fence.row(mid)["state"] == "handed_off"
    finally:
        await first.close()

    restarted = adapter_for(settings)
    restarted.attach_fence(fence)
    try:
        await asyncio.sleep(0.15)
        await restarted.retry_pass(publish)  # due again (its bookkeeping never ran), but refused
        assert restarted.store.scheduled() == []
    finally:
        await restarted.close()
        fence.close_connection()
    assert len(handler.messages) == 1 and handler.rcpts["defer1@example.com"] == 2  # sent once
    assert published == []  # the lost 250 is reported by nobody: the message's retry window decides
