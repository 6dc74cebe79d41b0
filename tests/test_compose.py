"""docker-compose.yml stays valid and declares every service (checked without a Docker engine)."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
SERVICES = {
    "kafka": None,
    "postgres": None,
    "command-handler": "python -m services.command_handler",
    "relay": "python -m services.command_handler.relay",
    "sender": "python -m services.sender",
    "timeout-sweeper": "python -m services.timeout_sweeper",
    "projections": "python -m services.projections",
    "webhooks": "python -m services.webhook_receiver",
    "simulator": "outreach simulator",
    "api": "python -m services.api",
    # Monitoring (tests/test_monitoring.py): Prometheus scrapes the services above, Grafana shows it.
    "prometheus": None,
    "grafana": None,
}
needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed (Debian's package; `make install` brings it as root)",
)


KEY = "Zm9yLXRlc3RzLW9ubHktZm9yLXRlc3RzLW9ubHktISE="  # a Fernet key (32 bytes, url-safe base64)


def compose(*args: str, key: str | None = KEY) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OUTREACH_API_ENCRYPTION_KEY"}
    if key is not None:
        env["OUTREACH_API_ENCRYPTION_KEY"] = key
    return subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *args], check=True, capture_output=True, text=True, timeout=60,
        env=env,
    ).stdout


@needs_compose
def test_compose_file_is_valid():
    compose("config", "-q")


@needs_compose
def test_every_service_is_declared():
    assert set(compose("config", "--services").split()) == set(SERVICES)


def load_compose() -> dict:
    """The file as data: with PyYAML if this venv has it, else with the Python that runs docker-compose v1
    (it depends on PyYAML)."""
    try:
        import yaml

        return yaml.safe_load(COMPOSE.read_text())
    except ImportError:
        pass
    binary = shutil.which("docker-compose")
    shebang = Path(binary).read_text(errors="replace").splitlines()[0] if binary else ""
    if not shebang.startswith("#!") or "python" not in shebang:
        pytest.skip("neither PyYAML nor a Python docker-compose to parse the file with")
    code = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"
    out = subprocess.run([shebang[2:].strip(), "-c", code, str(COMPOSE)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_services_share_one_image_and_configuration():
    services = load_compose()["services"]
    assert set(services) == set(SERVICES)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert str(services["kafka"]["environment"]["KAFKA_LOG_RETENTION_MS"]) == "-1"
    for name, command in SERVICES.items():
        if command is None:
            continue
        service = services[name]
        assert " ".join(service["command"]) == command
        assert service["build"] == "."
        assert service["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert service["environment"]["OUTREACH_EVENT_STORE"] == "postgres"
        assert service["environment"]["OUTREACH_DATA_DIR"] == "/data"
        assert any(volume == "/data" or volume.endswith(":/data") for volume in service["volumes"])
        # The read model is shared between containers, so it cannot be a file in one of their volumes.
        assert service["environment"]["OUTREACH_READ_MODEL_URL"].startswith("postgresql://")
        assert resolve(service["environment"]["OUTREACH_TWILIO_BASE_URL"], {}) == "http://simulator:8930"
        assert service["environment"]["OUTREACH_SIMULATOR_PUBLIC_URL"] == "http://simulator:8930"
        assert resolve(service["environment"]["OUTREACH_WEBHOOK_PUBLIC_URL"], {}) == "http://webhooks:8931"
    # Services other containers call listen on every interface, not only on their own loopback.
    assert services["simulator"]["environment"]["OUTREACH_SIMULATOR_HOST"] == "0.0.0.0"
    assert services["webhooks"]["environment"]["OUTREACH_WEBHOOK_HOST"] == "0.0.0.0"
    assert services["api"]["environment"]["OUTREACH_API_HOST"] == "0.0.0.0"


def test_every_service_that_scales_runs_two_replicas_each_with_its_own_data():
    """Two of each (docs/design.md, "Scaling out"); a named volume would be one /data for both replicas (two
    senders on one journal), so each replica has an anonymous volume of its own."""
    from outreach.up import SCALABLE

    services = load_compose()["services"]
    for name in SCALABLE:
        assert services[name]["deploy"]["replicas"] == 2, name
        assert services[name]["volumes"] == ["/data"], name
    assert "deploy" not in services["simulator"]
    assert services["api"]["ports"] == ["8080-8081:8080"]  # a host port per replica


def test_every_service_takes_the_one_encryption_key():
    """Channel credentials are sealed by the API and opened by the sender and the webhook receiver; the
    containers have separate volumes, so the key cannot be a file in one of them: compose requires it."""
    services = load_compose()["services"]
    for name, command in SERVICES.items():
        if command is None:
            continue
        value = str(services[name]["environment"]["OUTREACH_API_ENCRYPTION_KEY"])
        assert value.startswith("${OUTREACH_API_ENCRYPTION_KEY:?"), (name, value)


def resolve(value, shell: dict[str, str]) -> str:
    """A compose value with its `${NAME:-default}` / `${NAME:?message}` / `${NAME}` interpolated from `shell`, as
    docker-compose does (an empty variable takes the default; `:?` fails when unset or empty)."""
    def one(match: re.Match) -> str:
        name, operator, word = match.group(1), match.group(2), match.group(3) or ""
        given = shell.get(name, "")
        if operator == ":?" and not given:
            raise ValueError(word)
        return given or (word if operator == ":-" else "")
    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", one, str(value))


PROVIDER_VARIABLES = [
    "OUTREACH_TWILIO_BASE_URL", "OUTREACH_TWILIO_ACCOUNT_SID", "OUTREACH_TWILIO_AUTH_TOKEN",
    "OUTREACH_TWILIO_MESSAGING_SERVICE_SID", "OUTREACH_SENDGRID_BASE_URL", "OUTREACH_SENDGRID_API_KEY",
    "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY", "OUTREACH_EMAIL_PROVIDER", "OUTREACH_SMTP_HOST", "OUTREACH_SMTP_PORT",
    "OUTREACH_SMTP_USERNAME", "OUTREACH_SMTP_PASSWORD", "OUTREACH_SMTP_STARTTLS", "OUTREACH_UNSUBSCRIBE_SECRET",
    "OUTREACH_WEBHOOK_PUBLIC_URL",
]


def test_every_service_takes_the_providers_and_their_secrets_from_the_shell_never_requiring_them():
    """Passed through (`${VAR:-...}`) to every service: the simulator's without them, the real providers with
    them; compose requires none (the services' safe-defaults refusal does, only with a real endpoint)."""
    services = load_compose()["services"]
    for name, command in SERVICES.items():
        if command is None:
            continue
        environment = services[name]["environment"]
        for variable in PROVIDER_VARIABLES:
            assert str(environment[variable]).startswith("${%s:-" % variable), (name, variable)
        assert resolve(environment["OUTREACH_TWILIO_AUTH_TOKEN"], {"OUTREACH_TWILIO_AUTH_TOKEN": "t0k"}) == "t0k"


def service_settings(monkeypatch, shell: dict[str, str]):
    """The settings the sender container would start with, given `shell` (the host's variables)."""
    from services.common.settings import get_settings

    for variable in list(os.environ):
        if variable.startswith("OUTREACH_") or variable == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(variable)
    environment = load_compose()["services"]["sender"]["environment"]
    for variable, value in environment.items():
        monkeypatch.setenv(variable, resolve(value, {"OUTREACH_API_ENCRYPTION_KEY": KEY, **shell}))
    return get_settings()


def test_the_secrets_are_needed_only_with_a_real_provider(monkeypatch):
    from services.common.safe_defaults import unsafe_defaults

    assert unsafe_defaults(service_settings(monkeypatch, {})) == []  # the simulator: nothing to set
    real = {"OUTREACH_TWILIO_BASE_URL": "https://api.twilio.com",
            "OUTREACH_WEBHOOK_PUBLIC_URL": "https://hooks.example"}
    assert [p.setting for p in unsafe_defaults(service_settings(monkeypatch, real))] == [
        "OUTREACH_UNSUBSCRIBE_SECRET", "OUTREACH_TWILIO_AUTH_TOKEN", "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY"]
    smtp = {"OUTREACH_EMAIL_PROVIDER": "smtp", "OUTREACH_SMTP_HOST": "mail.example.org", "OUTREACH_SMTP_PORT": "587"}
    assert len(unsafe_defaults(service_settings(monkeypatch, smtp))) == 3
    secrets = {"OUTREACH_UNSUBSCRIBE_SECRET": "compose-test-unsubscribe-secret",
               "OUTREACH_TWILIO_AUTH_TOKEN": "tok",
               "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY": (
                   "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNN"
                   "RaINXvVpiglSI8eNEc6wEA3F+g==")}
    settings = service_settings(monkeypatch, {**real, **secrets})
    assert unsafe_defaults(settings) == [] and settings.twilio_url == "https://api.twilio.com"


@needs_compose
def test_compose_refuses_to_start_without_the_encryption_key():
    with pytest.raises(subprocess.CalledProcessError) as failed:
        compose("config", "-q", key=None)
    assert "OUTREACH_API_ENCRYPTION_KEY" in failed.value.stderr
    resolved = compose("config")
    assert resolved.count(KEY) == sum(1 for command in SERVICES.values() if command is not None)
