"""API tokens over HTTP, by the product's roles: org_admin creates, lists and revokes every role's tokens; admin
only campaigner tokens ("Admin: campaigns and Campaigner users"); campaigner and operations: 403.

The same `api.db` tokens as `outreach token create|list|revoke`: a token made here works with the CLI's list
and revoke, and the other way round. A token is shown once, in the 201 answer (`Cache-Control: no-store`).
"""
from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status

from services.api.auth import MANAGED_TOKEN_ROLES, TOKENS_RESPONSES, TokenManager, may_manage_token
from services.api.models import Problem, TokenCreateBody, TokenCreated, TokenView
from services.api.store import ApiStore

router = APIRouter(prefix="/tokens", tags=["tokens"], responses=TOKENS_RESPONSES)

TokenIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="The token's id (from the list).")]


def _store(request: Request) -> ApiStore:
    return request.app.state.store


def _forbidden(role: str, token_role: str, action: str) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, detail=f"role {role!r} may not {action} {token_role} tokens")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TokenCreated,
             summary="Create a token (shown once)",
             description="The answer holds the token; only its hash is stored, so it cannot be shown again. "
                         "org_admin may create any role's token, admin only campaigner tokens.",
             responses={201: {"description": "Created; the token is in this answer only."},
                        422: {"model": Problem, "description": "Unknown role, or an empty or over-long name; a "
                                                               "malformed request."}})
async def create_token(request: Request, response: Response, principal: TokenManager,
                       body: TokenCreateBody) -> dict[str, Any]:
    if not may_manage_token(principal, body.role):
        raise _forbidden(principal.role, body.role, "create")
    try:
        token, info = await asyncio.to_thread(_store(request).create_token, body.name, body.role,
                                              created_by=principal.name)
    except ValueError as exc:  # a name of blanks only
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    response.headers["Cache-Control"] = "no-store"
    return {"token": token, **asdict(info)}


@router.get("", response_model=list[TokenView], summary="List tokens (never the tokens themselves)",
            description="Oldest first. org_admin sees every token, admin only campaigner tokens.")
async def list_tokens(
    request: Request, principal: TokenManager,
    include_revoked: Annotated[bool, Query(description="Include revoked tokens.")] = False,
) -> list[dict[str, Any]]:
    infos = await asyncio.to_thread(_store(request).tokens, include_revoked=include_revoked,
                                    roles=MANAGED_TOKEN_ROLES[principal.role])
    return [asdict(info) for info in infos]


@router.delete("/{token_id}", response_model=TokenView, summary="Revoke a token (at once)",
               description="The token is refused from the next request on. Revoking a revoked token answers "
                           "its first revocation again (a retried DELETE is harmless). org_admin may revoke any "
                           "role's token, admin only campaigner tokens.",
               responses={404: {"model": Problem, "description": "No token with this id."}})
async def revoke_token(request: Request, principal: TokenManager, token_id: TokenIdPath) -> dict[str, Any]:
    store = _store(request)
    info = await asyncio.to_thread(store.token, token_id)
    if info is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no token {token_id}")
    if not may_manage_token(principal, info.role):  # a token's role never changes: checked once
        raise _forbidden(principal.role, info.role, "revoke")
    revoked = await asyncio.to_thread(store.revoke_token, token_id, revoked_by=principal.name)
    return asdict(revoked)
