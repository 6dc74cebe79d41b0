"""Monitoring under docker-compose (issue 13, item 3), checked without a Docker engine: promtool (Debian's
prometheus package) accepts the Prometheus configuration and its alert rules and their unit tests pass;
Prometheus scrapes every Outreach service of the compose file; compose runs Prometheus and Grafana with the
repository's files mounted; the Grafana dashboard parses and names only metrics the services export."""
import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_compose import load_compose

yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of schemathesis) reads the configurations")

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
METRICS_PORT = 9464  # OUTREACH_METRICS_PORT of every Outreach container in docker-compose.yml

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian's prometheus package; `make install` brings it as root)",
)

# The service modules, imported so that every metric any of them declares is in the registry.
SERVICE_MODULES = [
    "services.command_handler.app", "services.command_handler.relay", "services.sender.app",
    "services.timeout_sweeper.app", "services.projections.app", "services.webhook_receiver.app",
    "services.simulator.app", "services.api.app",
]
# Series Prometheus makes itself for each target, not exported by a service.
PROMETHEUS_SERIES = {"up"}
# What the dashboard must show (issue 13, item 3): throughput, statuses and failure reasons, lag, latency...
DASHBOARD_MUST_SHOW = {
    "outreach_messages_total", "outreach_consumer_lag_records", "outreach_relay_lag_events",
    "outreach_provider_request_duration_seconds_bucket", "outreach_breaker_state", "outreach_dlq_records",
    "outreach_pending_timers",
}


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=120)


def exported_series() -> set[str]:
    """Every series name the services can expose: each registered family with the suffixes the Prometheus
    text format gives its type (a labelled metric has no sample until first used, so the type decides)."""
    from prometheus_client import REGISTRY

    for module in SERVICE_MODULES:
        importlib.import_module(module)
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created"), "info": ("_info",), "stateset": ("",), "unknown": ("",)}
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
        names.update(sample.name for sample in family.samples)
    return names


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                   "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once strings, label matchers, ranges,
    grouping label lists and Grafana variables are taken out, other than function calls and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    return {match.group(1) for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text)
            if not match.group(2) and match.group(1).lower() not in PROMQL_KEYWORDS}


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            out.extend((inner["title"], target["expr"]) for target in inner.get("targets", []))
    return out


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus would receive it: Grafana's interval variables given values."""
    return re.sub(r"\$__(?:rate_interval|interval|range)\b", "5m", expr)


# ------------------------------------------------------------------ promtool


@needs_promtool
def test_promtool_accepts_the_prometheus_configuration_and_its_alert_rules():
    checked = promtool("check", "config", PROMETHEUS_CONFIG)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", ALERTS)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout


@needs_promtool
def test_promtool_refuses_a_configuration_that_is_wrong(tmp_path):
    """The check above can fail: a job without a port for its DNS discovery is refused."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    del config["rule_files"]
    del next(job for job in config["scrape_configs"] if "dns_sd_configs" in job)["dns_sd_configs"][0]["port"]
    broken = tmp_path / "prometheus.yml"
    broken.write_text(yaml.safe_dump(config))
    checked = promtool("check", "config", broken)
    assert checked.returncode != 0 and "port" in checked.stdout + checked.stderr


@needs_promtool
def test_the_alert_rules_fire_on_what_they_watch():
    """`promtool test rules`: each alert fires on a series showing its trouble (and not on a healthy one), and
    every alert of alerts.yml has such a case."""
    tested = promtool("test", "rules", ALERT_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    assert {case["alertname"] for case in cases if case["exp_alerts"]} == {rule["alert"] for rule in alert_rules()}


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """Each query, with Grafana's interval variables given values, as a recording rule promtool checks."""
    queries = [expr for dashboard in DASHBOARDS for _, expr in dashboard_queries(json.loads(dashboard.read_text()))]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{number}", "expr": grafana_to_promql(expr)} for number, expr in enumerate(queries)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(queries)} rules found" in checked.stdout


# ------------------------------------------------------------------ compose and the scrape configuration


def outreach_services(services: dict) -> set[str]:
    return {name for name, service in services.items() if service.get("build") == "."}


def test_prometheus_scrapes_every_replica_of_every_outreach_service():
    """Every compose service built from this repository is a scrape job on its metrics port; one that runs
    replicas is found by DNS (each replica's address), since a fixed target would reach one of them."""
    services = load_compose()["services"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    scraped: dict[str, str] = {}
    for job in config["scrape_configs"]:
        for discovery in job.get("dns_sd_configs", []):
            assert discovery["type"] == "A" and discovery["port"] == METRICS_PORT, job["job_name"]
            scraped.update((name, "dns") for name in discovery["names"])
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                if host in services:
                    assert int(port) == METRICS_PORT, target
                    scraped[host] = "static"
    outreach = outreach_services(services)
    assert set(scraped) == outreach
    for name in outreach:
        environment = services[name]["environment"]
        assert str(environment["OUTREACH_METRICS_PORT"]) == str(METRICS_PORT), name
        assert environment["OUTREACH_METRICS_HOST"] == "0.0.0.0", name
        if services[name].get("deploy", {}).get("replicas", 1) > 1:
            assert scraped[name] == "dns", name


def mounts(service: dict) -> dict[str, Path]:
    """A service's bind mounts of the repository: {container path: repository path}."""
    out = {}
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if source.startswith("./"):
            out[rest.split(":")[0]] = ROOT / source
    return out


def test_compose_runs_prometheus_with_the_repository_configuration():
    prometheus = load_compose()["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    assert "9090:9090" in prometheus["ports"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    container_path = Path(config_flag.partition("=")[2])
    mounted = mounts(prometheus)
    assert mounted[str(container_path.parent)] == PROMETHEUS_DIR
    assert (PROMETHEUS_DIR / container_path.name).is_file()
    for rule_file in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file(), rule_file  # relative to the configuration's folder


def test_compose_runs_grafana_provisioned_from_the_repository():
    """The data source is compose's Prometheus under the uid the dashboards name, and the dashboards
    provider reads the mounted folder of dashboard JSON."""
    services = load_compose()["services"]
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    mounted = mounts(grafana)
    provisioning = mounted["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA_DIR / "provisioning"
    sources = [source for path in sorted((provisioning / "datasources").glob("*.yml"))
               for source in yaml.safe_load(path.read_text())["datasources"]]
    assert [source["url"] for source in sources] == ["http://prometheus:9090"] and "prometheus" in services
    providers = [provider for path in sorted((provisioning / "dashboards").glob("*.yml"))
                 for provider in yaml.safe_load(path.read_text())["providers"]]
    assert len(providers) == 1
    dashboards_dir = mounted[providers[0]["options"]["path"]]
    assert sorted(dashboards_dir.glob("*.json")) == DASHBOARDS and DASHBOARDS
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounted[str(Path(home).parent)] / Path(home).name).is_file()
    for dashboard in DASHBOARDS:
        for panel in json.loads(dashboard.read_text())["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == sources[0]["uid"], panel["title"]


# ------------------------------------------------------------------ the metrics named


def test_metric_names_are_read_from_promql():
    """The reader the next tests rely on: it finds the selected names and nothing else."""
    assert metric_names('sum by (le, provider) (rate(a_bucket{route!~"/metrics|x_total"}[$__rate_interval]))') == {
        "a_bucket"}
    assert metric_names("histogram_quantile(0.95, sum(rate(b_bucket[5m])) by (le)) > 1e3 and on(job) c offset 5m"
                        ) == {"b_bucket", "c"}
    assert metric_names('max(d) - min_over_time(max(d)[15m:1m]) > 0 or absent(e{f="g"}) unless bool h') == {
        "d", "e", "h"}
    assert metric_names('label_replace(up, "x", "$1", "job", "(.*)")') == {"up"}


def test_every_dashboard_parses_and_names_only_metrics_the_services_export():
    exported = exported_series()
    assert {"outreach_messages_total", "outreach_dlq_records"} <= exported  # the registry was read
    assert DASHBOARDS, "no dashboard in deploy/grafana/dashboards"
    shown: set[str] = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"]
        queries = dashboard_queries(dashboard)
        assert queries, path.name
        for title, expr in queries:
            names = metric_names(expr)
            assert names, (title, expr)
            assert not names - exported - PROMETHEUS_SERIES, (title, expr, names - exported - PROMETHEUS_SERIES)
            shown |= names
    assert DASHBOARD_MUST_SHOW <= shown, DASHBOARD_MUST_SHOW - shown


def test_the_alert_rules_name_only_metrics_the_services_export():
    exported = exported_series()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names and not names - exported - PROMETHEUS_SERIES, (rule["alert"], names - exported)
