"""Metrics and health end to end (issue 13, item 1): every service of `outreach up` answers /metrics,
/healthz and /readyz at the address it recorded in data_dir/instances/, and the metrics move during a run:
messages by status rise, a dead consumer's lag rises and falls once it is back, a poison command raises the
DLQ count, a forged callback counts as a verification failure."""
from __future__ import annotations

import uuid

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from outreach.up import SERVICES
from schemas import topics
from services.common.observability import read_instances
from tests.conftest import async_wait_until
from tests.e2e_stack import stack_environment
from tests.e2e_support import ALL_TRUE, sms_contacts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STACK_SERVICES = tuple(SERVICES)  # the API too: every service
SIZE = 60
SWEEPER_GROUP = "outreach-timeout-sweeper"


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("metrics-data"),
                             OUTREACH_METRICS_LAG_INTERVAL_S="0.5")


def sample(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples called `name` whose labels include `labels`; None if there is none."""
    found = [s.value for family in text_string_to_metric_families(text) for s in family.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found) if found else None


class Scraper:
    def __init__(self, env: dict[str, str], http: aiohttp.ClientSession):
        self.env = env
        self.http = http

    def urls(self) -> dict[str, str]:
        return {r["service"]: r["url"] for r in read_instances(self.env["OUTREACH_DATA_DIR"])}

    async def get(self, url: str) -> tuple[int, str]:
        try:
            async with self.http.get(url) as response:
                return response.status, await response.text()
        except aiohttp.ClientError:
            return 0, ""

    async def metrics(self, service: str) -> str:
        status, text = await self.get(f"{self.urls()[service]}/metrics")
        assert status == 200, (service, status)
        return text

    async def value(self, service: str, name: str, **labels: str) -> float:
        return sample(await self.metrics(service), name, **labels) or 0.0


async def test_every_service_answers_and_the_metrics_move(stack, env, tail, commands):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        scraper = Scraper(env, http)
        await async_wait_until(lambda: set(scraper.urls()) >= set(SERVICES), 60, 0.1,
                               message=f"instances recorded: {sorted(scraper.urls())}")

        async def all_ready() -> bool:
            return all([(await scraper.get(f"{url}/readyz"))[0] == 200 for url in scraper.urls().values()])

        await async_wait_until(all_ready, 90, 0.2, message="not every service became ready")
        for service, url in scraper.urls().items():
            assert (await scraper.get(f"{url}/healthz"))[0] == 200, service
            text = await scraper.metrics(service)
            assert sample(text, "outreach_service_info", service=service) == 1, service
        # The HTTP services answer the same endpoints on their own ports too.
        for port in (env["OUTREACH_API_PORT"], env["OUTREACH_WEBHOOK_PORT"], env["OUTREACH_SIMULATOR_PORT"]):
            for path in ("/metrics", "/readyz", "/healthz"):
                assert (await scraper.get(f"http://127.0.0.1:{port}{path}"))[0] == 200, (port, path)

        delivered_before = await scraper.value("relay", "outreach_messages_total", channel="sms", status="delivered")
        dlq_before = await scraper.value("relay", "outreach_dlq_records")

        # A dead consumer shows as growing lag: the sweeper is killed, a campaign runs, its group falls behind.
        stack.kill("timeout-sweeper")
        campaign = await commands.create_ready_campaign("sms", sms_contacts(SIZE))
        started = await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
        assert started[0]["type"] == "CampaignRunStarted"
        await async_wait_until(lambda: tail.all_final(campaign, SIZE), 90, 0.1, message="the campaign never ended")

        async def sweeper_lag() -> float:
            return await scraper.value("relay", "outreach_consumer_lag_records", group=SWEEPER_GROUP,
                                       topic=topics.MESSAGE_STATUS)

        lagging = await async_wait_until(sweeper_lag, 30, 0.1, message="the dead sweeper's lag never rose")
        assert lagging >= SIZE  # at least one status record per message it never read
        stack.start_service("timeout-sweeper")
        async def sweeper_ready() -> bool:
            return (await scraper.get(f"{scraper.urls()['timeout-sweeper']}/readyz"))[0] == 200
        await async_wait_until(sweeper_ready, 60, 0.2, message="the restarted sweeper never became ready")
        await async_wait_until(lambda: _is_zero(sweeper_lag), 60, 0.2, message="the sweeper's lag never fell")

        # Messages by channel and status: the relay counted every delivery.
        async def delivered() -> bool:
            return await scraper.value("relay", "outreach_messages_total", channel="sms",
                                       status="delivered") >= delivered_before + SIZE
        await async_wait_until(delivered, 30, 0.2, message="delivered messages were not counted")
        relay = await scraper.metrics("relay")
        assert sample(relay, "outreach_messages_total", channel="sms", status="queued") >= SIZE
        await async_wait_until(lambda: _is_zero(lambda: scraper.value("relay", "outreach_relay_lag_events")), 30,
                               0.2, message="the relay never caught up")
        # Every other group caught up too (lag is a metric, not a readiness condition: all stayed ready).
        for group in ("outreach-command-handler", "outreach-projections", "outreach-sender-work"):
            await async_wait_until(lambda g=group: _is_zero(lambda: scraper.value(
                "relay", "outreach_consumer_lag_records", group=g)), 30, 0.2, message=f"{group} lags")

        # The sender's metrics moved.
        sender = await scraper.metrics("sender")
        assert sample(sender, "outreach_provider_request_duration_seconds_count", provider="twilio") > 0
        assert sample(sender, "outreach_rate_limiter_wait_seconds_count", channel="sms") > 0
        assert sample(sender, "outreach_breaker_state", provider="twilio") == 0
        assert sample(sender, "outreach_claims_in_flight") is not None
        sweeper = await scraper.metrics("timeout-sweeper")
        assert sample(sweeper, "outreach_pending_timers", kind="sending") is not None

        # A poison record on the commands topic is parked: the DLQ count rises.
        await commands.publish(b"not a command at all", key=str(uuid.uuid4()))

        async def dlq_rose() -> bool:
            return await scraper.value("relay", "outreach_dlq_records") >= dlq_before + 1
        await async_wait_until(dlq_rose, 30, 0.2, message="the DLQ count did not rise after a poison record")

        # A callback with a forged signature is refused and counted.
        webhooks = f"http://127.0.0.1:{env['OUTREACH_WEBHOOK_PORT']}"
        async with http.post(f"{webhooks}/twilio/status", data={"MessageSid": "SM1", "MessageStatus": "delivered"},
                             headers={"X-Twilio-Signature": "forged"}) as response:
            assert response.status == 403
        assert await scraper.value("webhooks", "outreach_webhook_verification_failures_total", provider="twilio") >= 1
        assert await scraper.value("webhooks", "outreach_http_requests_total", route="/twilio/status") >= 1
        async with http.get(f"http://127.0.0.1:{env['OUTREACH_API_PORT']}/healthz") as response:
            assert response.status == 200
        assert await scraper.value("api", "outreach_http_requests_total", route="/healthz", code="200") >= 1


async def _is_zero(read) -> bool:
    return await read() == 0
