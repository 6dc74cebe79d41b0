"""The event store restarted mid-campaign (issue 10): a private PostgreSQL cluster the test makes with initdb
and drives with pg_ctl holds the event store and the hand-off fence; it is stopped for a few seconds while an
SMS campaign runs. Every service waits the outage out: nothing is parked in the DLQ, nothing reaches the
provider twice, every message ends delivered."""
from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from schemas import topics
from services.common.embedded_broker import free_port
from tests.conftest import async_wait_until
from tests.e2e_stack import simulator_submissions, stack_environment
from tests.e2e_support import ALL_TRUE

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SIZE = 600
TAIL_TOPICS = (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS, topics.COMMANDS_DLQ)


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name)
                                                                         else [])
    if not found:
        pytest.skip(f"PostgreSQL's {name} is not installed")
    return found[-1]


class PrivateCluster:
    """A PostgreSQL cluster of the test's own (initdb), on its own port, run as the postgres user."""

    def __init__(self, root: Path):
        self.data = root / "pgdata"
        self.port = free_port("127.0.0.1")
        self.log = root / "postgres.log"

    def _as_postgres(self, *argv: str) -> None:
        runas = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
        subprocess.run([*runas, *argv], check=True, capture_output=True, timeout=60)

    def create(self) -> None:
        self.data.parent.chmod(0o777)  # the postgres user makes its folder here
        self._as_postgres(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    def start(self) -> None:
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                          "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="module")
def cluster():
    # Outside pytest's temporary folders: those are private to root, and the cluster runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="outreach-private-postgres-"))
    made = PrivateCluster(root)
    try:
        made.create()
        yield made
    finally:
        try:
            made.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory, cluster):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("store-outage-data"),
                             OUTREACH_POSTGRES_DSN=cluster.dsn, OUTREACH_SMS_RATE="150")


def deliverable_sms(n: int) -> list[dict]:
    return [{"row": i + 2, "destination": f"+1{200 + i % 800}{650 + i // 800:03d}{i % 10000:04d}",
             "variables": {"name": f"P{i}"}} for i in range(n)]


async def test_a_postgresql_restart_mid_campaign_parks_nothing_and_loses_nothing(stack, env, cluster, tail, commands):
    campaign = await commands.create_ready_campaign("sms", deliverable_sms(SIZE))
    await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: sum(r["status"] == "delivered" for r in tail.statuses(campaign)) >= SIZE // 6,
                           60, message="nothing was delivered before the outage")

    await asyncio.to_thread(cluster.stop, "fast")  # connections terminated, the store gone
    await asyncio.sleep(4)
    await asyncio.to_thread(cluster.start)

    await async_wait_until(lambda: tail.latest_status(campaign) == "complete"
                           and len(tail.latest_per_message(campaign)) == SIZE, 120, interval_s=0.25,
                           message=f"the campaign did not complete: {tail.latest_status(campaign)}")
    final = Counter(r["status"] for r in tail.latest_per_message(campaign).values())
    assert final == {"delivered": SIZE}, final
    # The session's broker holds other modules' parked records too: ours would name the campaign.
    parked = [v for v in tail.values(topics.COMMANDS_DLQ) if isinstance(v, bytes) and campaign.encode() in v
              or isinstance(v, dict) and v.get("campaign_id") == campaign]
    assert parked == [], "a record was parked during a transient outage"
    log = await simulator_submissions(env)
    handed = Counter({m: len(entries) for m, entries in log.items()
                      if entries and entries[0].get("campaign_id") == campaign})
    assert len(handed) == SIZE and max(handed.values()) == 1, "a message reached the provider twice"
