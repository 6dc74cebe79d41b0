"""Where the CLI finds things, whatever the current folder.

- **The API and the token** (campaign commands, `outreach login`): `OUTREACH_API_URL` and `OUTREACH_API_TOKEN`
  from the environment, else `config.toml` in `$XDG_CONFIG_HOME/outreach/` (default `~/.config/outreach/`),
  written by `outreach login` (mode 0600: it holds a bearer token). `OUTREACH_CONFIG` names another file.
- **The stack's data folder** (operator commands: `token`, `replay`): `OUTREACH_DATA_DIR` when set, else the
  one named by the stack file `outreach up` writes, `$XDG_STATE_HOME/outreach/stack.json` (default
  `~/.local/state/outreach/`), else `./var` (the settings' default, relative to the current folder).
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.settings import Settings, get_settings

CONFIG_ENV = "OUTREACH_CONFIG"
URL_ENV = "OUTREACH_API_URL"
TOKEN_ENV = "OUTREACH_API_TOKEN"
DATA_DIR_ENV = "OUTREACH_DATA_DIR"


def _xdg(variable: str, default: str) -> Path:
    value = os.environ.get(variable)
    if value and Path(value).is_absolute():  # the XDG spec: a relative path is invalid, ignore it
        return Path(value)
    return Path.home() / default


def config_path() -> Path:
    value = os.environ.get(CONFIG_ENV)
    if value:
        return Path(value).expanduser()
    return _xdg("XDG_CONFIG_HOME", ".config") / "outreach" / "config.toml"


def stack_path() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "outreach" / "stack.json"


# ------------------------------------------------------------------ the API and its token

class ConfigError(RuntimeError):
    """No API to talk to, or a config file that cannot be read."""


@dataclass(frozen=True)
class ApiTarget:
    url: str
    token: str
    source: str  # where they came from, for messages


def read_config(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _toml_string(value: str) -> str:
    # A TOML basic string: JSON's escapes are TOML's (ensure_ascii keeps every control character escaped).
    return json.dumps(value, ensure_ascii=True)


def write_config(url: str, token: str, path: Path | None = None) -> Path:
    """Write the API's URL and the token to the config file, readable by its owner only."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"[api]\nurl = {_toml_string(url)}\ntoken = {_toml_string(token)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode on open: make it private
    return path


def api_target() -> ApiTarget:
    """The API's URL and the token: each from the environment, else from the config file."""
    api = read_config().get("api") or {}
    if not isinstance(api, dict):
        raise ConfigError(f"{config_path()}: [api] must be a table")
    url = os.environ.get(URL_ENV) or api.get("url")
    token = os.environ.get(TOKEN_ENV) or api.get("token")
    if not url or not token:
        missing = " and ".join(name for name, value in ((URL_ENV, url), (TOKEN_ENV, token)) if not value)
        raise ConfigError(f"no {missing}: sign in with `outreach login --url URL --token TOKEN` (writes "
                          f"{config_path()}) or set the environment variable(s)")
    if not isinstance(url, str) or not isinstance(token, str):
        raise ConfigError(f"{config_path()}: url and token must be strings")
    source = "environment" if os.environ.get(URL_ENV) and os.environ.get(TOKEN_ENV) else str(config_path())
    return ApiTarget(url.rstrip("/"), token, source)


# ------------------------------------------------------------------ the stack's data folder

def write_stack(data_dir: Path, **extra: Any) -> Path | None:
    """Written by `outreach up`: the absolute data folder of the stack it runs (None if it cannot be written)."""
    path = stack_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"data_dir": str(Path(data_dir).resolve()), **extra}, indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        return None
    return path


def stack_data_dir() -> Path | None:
    """The data folder named by the stack file, if there is one."""
    try:
        value = json.loads(stack_path().read_text()).get("data_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(value) if isinstance(value, str) and value else None


def operator_settings() -> Settings:
    """The settings of an operator command: the data folder from OUTREACH_DATA_DIR, else the stack file's."""
    settings = get_settings()
    if os.environ.get(DATA_DIR_ENV):
        return settings
    found = stack_data_dir()
    if found is None:
        return settings
    return settings.model_copy(update={"data_dir": found})
