"""`outreach token create|list|revoke`: API bearer tokens (stored hashed in the PostgreSQL store, or in the
running stack's data_dir/api.db: OUTREACH_DATA_DIR, else the folder named by the stack file `outreach up`
writes; an operator command, local to the stack's machine or its API container).

    outreach token create NAME --role org_admin|admin|campaigner|operations   prints the token, once
    outreach token list [--all]
    outreach token revoke TOKEN_ID|NAME                                        by id, or every token of NAME
"""
from __future__ import annotations

import json
from dataclasses import asdict
from enum import Enum

import typer
from rich.console import Console
from rich.table import Table

from outreach.client import default_principal
from outreach.config import operator_settings
from services.api.store import ROLES, ApiStore, token_store

app = typer.Typer(no_args_is_help=True, help="HTTP API tokens: create, list, revoke.")
console = Console(highlight=False)

RoleChoice = Enum("RoleChoice", {role: role for role in ROLES}, type=str)
DEMO_PRINCIPAL = "demo"


def _store() -> ApiStore:
    # The running stack's store, whatever the current folder: OUTREACH_DATA_DIR, else the stack file of
    # `outreach up` (outreach/config.py); on PostgreSQL, OUTREACH_POSTGRES_DSN.
    return token_store(operator_settings())


@app.command("create")
def create(
    name: str = typer.Argument(..., metavar="NAME",
                               help="Principal name: written as issued_by on the commands this token sends."),
    role: RoleChoice = typer.Option(..., "--role", help="org_admin, admin, campaigner or operations."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create a token and print it (only now: it is stored hashed)."""
    with _store() as store:
        try:
            token, info = store.create_token(name, role.value, created_by=cli_actor())
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps({"token": token, **asdict(info)}, indent=2))
        return
    console.print(f"token {info.token_id} for {info.principal} ({info.role}); it is shown only once:")
    typer.echo(token)


@app.command("list")
def list_tokens(
    include_revoked: bool = typer.Option(False, "--all", help="Include revoked tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List tokens (never the tokens themselves: only their ids, principals and roles)."""
    with _store() as store:
        infos = store.tokens(include_revoked=include_revoked)
    if as_json:
        typer.echo(json.dumps([asdict(i) for i in infos], indent=2))
        return
    table = Table()
    for column in ("id", "principal", "role", "created", "by", "revoked", "by"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.token_id, info.principal, info.role, info.created_at, info.created_by or "",
                      info.revoked_at or "", info.revoked_by or "")
    console.print(table)


@app.command("revoke")
def revoke(target: str = typer.Argument(..., metavar="TOKEN_ID|NAME",
                                         help="A token id, or a principal name (all its tokens).")) -> None:
    """Revoke a token at once (the API checks every request)."""
    with _store() as store:
        count = store.revoke(target, revoked_by=cli_actor())
    if not count:
        console.print(f"[red]no live token with id or principal {target!r}[/red]")
        raise typer.Exit(1)
    console.print(f"revoked {count} token(s)")


def cli_actor() -> str:
    """Who is at the terminal, for the tokens' audit columns (the CLI has no token of its own)."""
    return f"cli:{default_principal()}"


def demo_token() -> str:
    """A fresh org_admin token for `outreach up --demo` (the previous demo tokens are revoked)."""
    with _store() as store:
        store.revoke(DEMO_PRINCIPAL, revoked_by="outreach up --demo")
        token, _ = store.create_token(DEMO_PRINCIPAL, "org_admin", created_by="outreach up --demo")
    return token
