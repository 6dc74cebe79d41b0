"""Safe defaults: the public development secrets never meet a real provider.

The simulator's credentials and the placeholder secrets are in this repository, so anyone knows them. While
every provider endpoint is the simulator's that is harmless; once one is real, they would let anyone forge
provider callbacks (Twilio statuses and inbound STOP/START, SendGrid events) or unsubscribe links. So, with
any real endpoint, each of these must have a value of its own:

- `OUTREACH_UNSUBSCRIBE_SECRET` (default `change-me-unsubscribe-secret`): signs unsubscribe links; at least
  16 characters;
- `OUTREACH_TWILIO_AUTH_TOKEN` (default `simulator-auth-token`): verifies Twilio callbacks (the receiver's
  Twilio routes answer even when SMS is not on Twilio);
- `OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY` (default unset: the simulator's key): verifies SendGrid events
  (likewise).

A real endpoint: `twilio_base_url` / `sendgrid_base_url` set to anything but the simulator's URL
(`settings.simulator_url`: `OUTREACH_SIMULATOR_PUBLIC_URL`, else `http://SIMULATOR_HOST:SIMULATOR_PORT`; a
loopback name stands for any other), or `email_provider=smtp` with a host and port other than the development
SMTP (`127.0.0.1:2525`, the defaults). The environment and the channel settings set over the API count alike
(the Twilio token and the SendGrid key may come from either).

`real_endpoints(settings)` and `unsafe_defaults(settings)` are pure. The services started by
`services.common.runtime.run_service` (command handler, relay, sender, timeout sweeper, projections, webhook
receiver) exit with status 78 and `refusal` while `unsafe_defaults` is not empty, the API fails its start-up
(services/api/settings_routes.py, uvicorn exits 3) and answers 422 to channel settings that would make it so,
and the channel-settings feed skips a record that would (services/common/channel_settings.py). The provider
simulator is not checked: it is the development provider, never talked to with real secrets.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from services.common import webhook_signatures as sigs
from services.common.settings import Settings

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"})
DEVELOPMENT_SMTP = ("127.0.0.1", 2525)
MIN_UNSUBSCRIBE_SECRET_CHARS = 16
_FIELDS = Settings.model_fields
DEFAULT_UNSUBSCRIBE_SECRET = _FIELDS["unsubscribe_secret"].default.get_secret_value()
DEFAULT_TWILIO_AUTH_TOKEN = _FIELDS["twilio_auth_token"].default.get_secret_value()


@dataclass(frozen=True)
class Problem:
    """One secret that keeps its public value: `setting` is the environment variable to set."""
    setting: str
    reason: str
    over_the_api: str | None = None  # where the channel settings set it instead, if they can

    def __str__(self) -> str:
        where = f" (or {self.over_the_api})" if self.over_the_api else ""
        return f"{self.setting}{where}: {self.reason}"


def _endpoint(url: str) -> tuple[str, str, int | None, str] | None:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, host, port, parts.path.rstrip("/")


def _same_host(a: str, b: str) -> bool:
    return a == b or (a in LOOPBACK and b in LOOPBACK)


def is_simulator_url(settings: Settings, url: str | None) -> bool:
    """True when `url` (a provider base URL; None: unset) is the simulator's."""
    if url is None or not url.strip():
        return True
    given, simulator = _endpoint(url), _endpoint(settings.simulator_url)
    if given is None or simulator is None:
        return False
    return (given[0] == simulator[0] and _same_host(given[1], simulator[1]) and given[2] == simulator[2]
            and given[3] == simulator[3])


def is_development_smtp(host: str, port: int) -> bool:
    return _same_host(host.strip().lower(), DEVELOPMENT_SMTP[0]) and port == DEVELOPMENT_SMTP[1]


def real_endpoints(settings: Settings) -> list[str]:
    """The provider endpoints that are not the simulator's, as `SETTING=value` (nothing secret)."""
    found = []
    if not is_simulator_url(settings, settings.twilio_base_url):
        found.append(f"OUTREACH_TWILIO_BASE_URL={settings.twilio_base_url}")
    if not is_simulator_url(settings, settings.sendgrid_base_url):
        found.append(f"OUTREACH_SENDGRID_BASE_URL={settings.sendgrid_base_url}")
    if settings.email_provider == "smtp" and not is_development_smtp(settings.smtp_host, settings.smtp_port):
        found.append(f"OUTREACH_SMTP_HOST:OUTREACH_SMTP_PORT={settings.smtp_host}:{settings.smtp_port}")
    return found


def _is_simulator_sendgrid_key(value: str | None) -> bool:
    if value is None or not value.strip():
        return True
    if value.strip() == sigs.SIMULATOR_SENDGRID_PUBLIC_KEY:
        return True
    try:  # the same key in another form (PEM)
        given = sigs.load_sendgrid_public_key(value)
    except (ValueError, TypeError):
        return False  # not the simulator's (the receiver logs it as unusable)
    return given.public_numbers() == sigs.load_sendgrid_public_key(sigs.SIMULATOR_SENDGRID_PUBLIC_KEY).public_numbers()


def unsafe_defaults(settings: Settings) -> list[Problem]:
    """The secrets still at their public development values while a real provider endpoint is configured
    (empty when every endpoint is the simulator's, or every secret is set)."""
    if not real_endpoints(settings):
        return []
    problems = []
    unsubscribe = settings.unsubscribe_secret.get_secret_value().strip()
    if unsubscribe == DEFAULT_UNSUBSCRIBE_SECRET or len(unsubscribe) < MIN_UNSUBSCRIBE_SECRET_CHARS:
        what = "the default" if unsubscribe == DEFAULT_UNSUBSCRIBE_SECRET else "too short"
        problems.append(Problem(
            "OUTREACH_UNSUBSCRIBE_SECRET",
            f"signs unsubscribe links; it is {what}: set a random value of at least "
            f"{MIN_UNSUBSCRIBE_SECRET_CHARS} characters, the same for every service"))
    token = settings.twilio_auth_token.get_secret_value()
    if not token.strip() or token.strip() == DEFAULT_TWILIO_AUTH_TOKEN:
        problems.append(Problem(
            "OUTREACH_TWILIO_AUTH_TOKEN",
            "verifies Twilio callbacks; it is the simulator's: set your Twilio account's auth token (a random "
            "value if you do not use Twilio: its callback routes answer all the same)",
            "credentials.auth_token of PUT /settings/channels/sms"))
    if _is_simulator_sendgrid_key(settings.sendgrid_webhook_public_key):
        problems.append(Problem(
            "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY",
            "verifies SendGrid events; it is the simulator's: set your Event Webhook verification key (any "
            "ECDSA P-256 public key of yours if you do not use SendGrid)",
            "credentials.webhook_public_key of PUT /settings/channels/email"))
    return problems


def refusal(settings: Settings, problems: list[Problem], *, doing: str = "refusing to start") -> str:
    """The message naming the real endpoints and every setting to set."""
    lines = [f"{doing}: a real provider endpoint is configured ({', '.join(real_endpoints(settings))}) while "
             "these secrets keep their public development values; set each:"]
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


class UnsafeDefaults(RuntimeError):
    """Raised by `check` with the refusal message."""


def check(settings: Settings, *, doing: str = "refusing to start") -> None:
    problems = unsafe_defaults(settings)
    if problems:
        raise UnsafeDefaults(refusal(settings, problems, doing=doing))
