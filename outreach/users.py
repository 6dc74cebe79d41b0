"""`outreach user create|list|disable|enable`: the web console's people (an operator command, local like
`outreach token`: the PostgreSQL store, or the running stack's data_dir/api.db).

    outreach user create NAME --role org_admin|admin|campaigner|operations   asks the password twice
    outreach user create NAME --role ROLE --password-stdin                    reads it from standard input
    outreach user list
    outreach user disable|enable NAME                                        disabling ends its sessions

The first org admin is made so; later ones can be made from the console.
"""
from __future__ import annotations

import json
import secrets
import sys
from dataclasses import asdict

import typer
from rich.console import Console
from rich.table import Table

from outreach.config import operator_settings
from outreach.tokens import RoleChoice, cli_actor
from services.api.passwords import MIN_PASSWORD_LENGTH
from services.api.store import ApiStore, token_store

app = typer.Typer(no_args_is_help=True, help="Web console users: create, list, disable, enable.")
console = Console(highlight=False)

DEMO_USER = "demo"


def _store() -> ApiStore:
    # The running stack's store, found as `outreach token` finds it (outreach/config.py); no encryption key.
    return token_store(operator_settings())


@app.command("create")
def create(
    name: str = typer.Argument(..., metavar="NAME", help="Username (lower case: a-z, 0-9, '.', '_', '@', '-'); the "
                                                         "user acts as user:NAME."),
    role: RoleChoice = typer.Option(..., "--role", help="org_admin, admin, campaigner or operations."),
    password_stdin: bool = typer.Option(False, "--password-stdin",
                                        help="Read the password from standard input (its first line), not a "
                                             "prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create a console user (stored with an Argon2id hash of the password)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt(f"Password (at least {MIN_PASSWORD_LENGTH} characters)", hide_input=True,
                                confirmation_prompt=True)
    with _store() as store:
        try:
            info = store.create_user(name, role.value, password, created_by=cli_actor())
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(asdict(info), indent=2))
        return
    console.print(f"user {info.username} ({info.role}) created; sign in at /console/sign-in")


@app.command("list")
def list_users(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every console user (disabled ones too), never a password hash."""
    with _store() as store:
        infos = store.users()
    if as_json:
        typer.echo(json.dumps([asdict(i) for i in infos], indent=2))
        return
    table = Table()
    for column in ("user", "role", "created", "by", "disabled", "by"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.username, info.role, info.created_at, info.created_by, info.disabled_at or "",
                      info.disabled_by or "")
    console.print(table)


def _set_disabled(name: str, disabled: bool) -> None:
    with _store() as store:
        try:
            info = store.set_disabled(name, disabled, by=cli_actor())
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
    console.print(f"user {info.username} {'disabled' if info.disabled_at else 'enabled'}")


@app.command("disable")
def disable(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Disable a user: it can no longer sign in, and its sessions end at once."""
    _set_disabled(name, True)


@app.command("enable")
def enable(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Enable a disabled user again."""
    _set_disabled(name, False)


def demo_user() -> tuple[str, str]:
    """The demo's org admin for `outreach up --demo`, with a fresh random password: (username, password)."""
    password = secrets.token_urlsafe(12)
    with _store() as store:
        if store.user(DEMO_USER) is None:
            store.create_user(DEMO_USER, "org_admin", password, created_by="outreach up --demo")
        else:
            store.set_password(DEMO_USER, password, changed_by="outreach up --demo")
            store.set_disabled(DEMO_USER, False, by="outreach up --demo")
            store.set_role(DEMO_USER, "org_admin", by="outreach up --demo")
    return DEMO_USER, password
