"""Every setting of every service, read from the environment (names fixed by the wire contract and docs/design.md)."""
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.phone import check_region


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class LogSettings(BaseSettings):
    """How a process logs (services/common/logs.py). Read on their own before the other settings, so that a
    refusal of any other setting is already written in the chosen format."""
    # An empty variable is an unset one (its default): docker-compose passes `${OUTREACH_X:-}` through to every
    # container, and an empty secret must never be taken for a chosen one.
    model_config = SettingsConfigDict(env_prefix="OUTREACH_", extra="ignore", populate_by_name=True,
                                      env_ignore_empty=True)

    log_level: LogLevel = "INFO"
    # text: `time logger LEVEL message campaign=… message=… command=…`; json: one JSON object a line.
    log_format: Literal["text", "json"] = "text"
    # Per-logger levels over the defaults, as JSON: '{"aiokafka": "INFO", "outreach.sender": "DEBUG"}'
    # (aiokafka and httpx log at WARNING otherwise, whatever log_level says).
    log_levels: dict[str, LogLevel] = {}
    # Names this instance's local files when several instances of a service share one data_dir (`outreach up
    # --instances`): "" for the first, then "1", "2"... Letters, digits, "-", "_" and "." only.
    instance_name: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$", max_length=64)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_levels", mode="before")
    @classmethod
    def _levels_any_case(cls, value: object) -> object:
        if isinstance(value, dict):
            return {name: level.strip().upper() if isinstance(level, str) else level for name, level in value.items()}
        return value


class Settings(LogSettings):

    # Broker
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS")
    )
    external_kafka: bool = False
    # Names this deployment's consumer groups (`{deployment}-sender-work`...), so operators can tell two
    # deployments on one Kafka apart and they never share (split) each other's work.
    deployment: str = Field("outreach", pattern=r"^[a-z0-9][a-z0-9_.-]{0,47}$")
    partitions: int = Field(8, ge=1)
    kafka_session_timeout_ms: int = 6000
    kafka_heartbeat_ms: int = 500

    # Stores
    event_store: Literal["sqlite", "postgres"] = "sqlite"
    data_dir: Path = Path("./var")
    # instance_name (LogSettings): this instance's local files are data_dir/NAME-instance_name.suffix
    sqlite_path: Path | None = None
    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    # The read model: a postgresql:// DSN or sqlite:///path; default the SQLite file data_dir/read-model.db
    read_model_url: str | None = None

    # Contacts (contract v1.1): an ISO 3166 region (`US`, any case) the importers and the command handler
    # read national and formatted phone numbers with, to E.164 (schemas/phone.py); unset: the cell as given.
    default_region: str | None = None

    # Timers (seconds; small values allowed so tests can compress time)
    sent_timeout_s: float = Field(600, ge=0.1)
    sending_timeout_s: float = Field(600, ge=0.1)
    retry_window_s: float = Field(259200, ge=0.1)
    smtp_retry_s: float = Field(300, ge=0.1)

    # Sending
    presend_retries: int = Field(3, ge=0)
    presend_backoff_s: float = Field(1, ge=0)
    sms_rate: float = Field(100, gt=0)
    email_rate: float = Field(1000, gt=0)
    email_batch: int = Field(1000, ge=1, le=1000)

    # Simulator
    sim_defer_interval_s: float = Field(1, ge=0.1)
    sim_late_receipt_s: float | None = None
    simulator_host: str = "127.0.0.1"
    simulator_port: int = 8930
    # How the services reach the simulator; default http://simulator_host:simulator_port. A provider URL equal
    # to it is the simulator's (services/common/safe_defaults.py), e.g. http://simulator:8930 in docker-compose.
    simulator_public_url: str | None = None

    # Providers: the HTTP simulator speaks the Twilio and SendGrid APIs, so the real adapters are the default;
    # `inprocess` uses the simulator's rules without HTTP (to measure the engine alone). With any provider
    # endpoint that is not the simulator's, the secrets below must not keep their public development values:
    # services refuse to start, the API refuses such channel settings (services/common/safe_defaults.py).
    sms_provider: Literal["twilio", "inprocess"] = "twilio"
    email_provider: Literal["sendgrid", "smtp", "inprocess"] = "sendgrid"
    provider_concurrency: int = Field(64, ge=1)
    twilio_base_url: str | None = None  # default: the simulator
    twilio_account_sid: str = "ACsimulator00000000000000000000000"
    twilio_auth_token: SecretStr = SecretStr("simulator-auth-token")
    twilio_messaging_service_sid: str = "MGsimulator00000000000000000000000"
    sendgrid_base_url: str | None = None  # default: the simulator
    sendgrid_api_key: SecretStr = SecretStr("SG.simulator-api-key")
    # Base64 DER (SubjectPublicKeyInfo) ECDSA P-256 key that verifies SendGrid's Event Webhook; default: the simulator's.
    sendgrid_webhook_public_key: str | None = None
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False

    # Webhook receiver (provider callbacks, inbound SMS, unsubscribe links)
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 8931
    webhook_public_url: str | None = None  # how providers reach the receiver; default http://host:port
    unsubscribe_secret: SecretStr = SecretStr("change-me-unsubscribe-secret")

    # HTTP API (services/api): bearer tokens live hashed in the PostgreSQL store, else data_dir/api.db.
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    # Fernet key that encrypts stored channel credentials; default: generated once into
    # data_dir/api-encryption.key (mode 0600).
    api_encryption_key: SecretStr | None = None
    # The web console (services/api/console, served by the API under /console): a sign-in session ends
    # console_session_hours after sign-in, or console_idle_minutes after its last request, whichever is first.
    # console_https: the console is reached over https (directly or behind a proxy): its cookies are `Secure`.
    console_session_hours: float = Field(8, gt=0, le=24 * 30)
    console_idle_minutes: float = Field(30, gt=0)
    console_https: bool = False

    # Metrics and health (services/common/observability.py): every process serves /metrics, /healthz and
    # /readyz on metrics_host:metrics_port; 0 = a free port, recorded in data_dir/instances/ (`outreach up`
    # gives every instance 0). The relays compute consumer lag and DLQ records every lag_interval_s.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_lag_interval_s: float = Field(5.0, ge=0.05)
    # How often each process rewrites its instance record and publishes its heartbeat on the broker
    # (outreach.internal.heartbeats), how `outreach status` finds the instances of every host.
    heartbeat_interval_s: float = Field(5.0, ge=0.05)
    # Where other hosts reach this process's endpoints, as its heartbeat says (e.g. http://sender-2:9464);
    # default http://metrics_host:port, the host's name in place of 0.0.0.0 (docker-compose's containers).
    metrics_advertised_url: str | None = None

    @field_validator("default_region", mode="before")
    @classmethod
    def _known_region(cls, value: object) -> object:
        if value is None:
            return None
        if isinstance(value, str):
            value = value.strip().upper()
        try:
            return check_region(value)
        except ValueError as exc:
            raise ValueError(f"OUTREACH_DEFAULT_REGION: {exc}") from None

    @property
    def event_store_sqlite_path(self) -> Path:
        return self.sqlite_path or self.data_dir / "outreach-events.db"

    def group_id(self, role: str) -> str:
        """The consumer group of one service role in this deployment, e.g. `outreach-sender-work`."""
        return f"{self.deployment}-{role}"

    def instance_file(self, file_name: str) -> Path:
        """`data_dir/file_name`, the instance's name inserted before the suffix when it has one."""
        if not self.instance_name:
            return self.data_dir / file_name
        stem, dot, suffix = file_name.partition(".")
        return self.data_dir / f"{stem}-{self.instance_name}{dot}{suffix}"

    @property
    def simulator_url(self) -> str:
        return (self.simulator_public_url or f"http://{self.simulator_host}:{self.simulator_port}").rstrip("/")

    @property
    def twilio_url(self) -> str:
        return (self.twilio_base_url or self.simulator_url).rstrip("/")

    @property
    def sendgrid_url(self) -> str:
        return (self.sendgrid_base_url or self.simulator_url).rstrip("/")

    @property
    def webhook_url(self) -> str:
        return (self.webhook_public_url or f"http://{self.webhook_host}:{self.webhook_port}").rstrip("/")

    @property
    def late_receipt_s(self) -> float:
        if self.sim_late_receipt_s is not None:
            return self.sim_late_receipt_s
        return self.sent_timeout_s + max(1.0, self.sent_timeout_s / 2)


def get_settings() -> Settings:
    """Settings as the environment says now (cheap; tests change the environment between runs)."""
    return Settings()
