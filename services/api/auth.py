"""Bearer-token authentication and the product's roles (shared/product-reference.md, Roles).

org_admin, admin and campaigner use campaigns; channel settings are org_admin only; operations gets
nothing. API tokens: org_admin manages every role's, admin only campaigner tokens ("Admin: campaigns and
Campaigner users"). No or unknown token -> 401 (with `WWW-Authenticate: Bearer`), a known token of the wrong
role -> 403.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.models import Problem
from services.api.store import ROLES, ApiStore, Principal

CAMPAIGN_ROLES = frozenset({"org_admin", "admin", "campaigner"})
SETTINGS_ROLES = frozenset({"org_admin"})
# Which roles' tokens each role may create, list and revoke (a role not listed manages none).
MANAGED_TOKEN_ROLES: dict[str, frozenset[str]] = {"org_admin": frozenset(ROLES), "admin": frozenset({"campaigner"})}
TOKEN_ROLES = frozenset(MANAGED_TOKEN_ROLES)

# auto_error=False: we answer 401 ourselves (with the header RFC 6750 asks for), the same for every case.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>` (`outreach token create`).")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The principal of the request's bearer token (a sync dependency: FastAPI runs the lookup in a thread)."""
    if credentials is None or not credentials.credentials:
        raise _unauthorized("missing bearer token")
    store: ApiStore = request.app.state.store
    principal = store.authenticate(credentials.credentials)
    if principal is None:
        raise _unauthorized("unknown or revoked token")
    return principal


def _role_guard(allowed: frozenset[str], what: str):
    def guard(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if principal.role not in allowed:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                detail=f"role {principal.role!r} may not use {what}")
        return principal

    return guard


def may_manage_token(principal: Principal, token_role: str) -> bool:
    """May this principal create, see or revoke a token of `token_role`?"""
    return token_role in MANAGED_TOKEN_ROLES.get(principal.role, frozenset())


campaign_user = _role_guard(CAMPAIGN_ROLES, "campaigns")
org_admin = _role_guard(SETTINGS_ROLES, "channel settings")
token_manager = _role_guard(TOKEN_ROLES, "API tokens")

CampaignUser = Annotated[Principal, Depends(campaign_user)]
OrgAdmin = Annotated[Principal, Depends(org_admin)]
TokenManager = Annotated[Principal, Depends(token_manager)]

# Documented on every authenticated route (OpenAPI), each error with its body (Problem: `detail`).
_UNAUTHORIZED = {"model": Problem, "description": "No bearer token, or an unknown or revoked one."}
MALFORMED = {"model": Problem, "description": "A malformed request: a parameter, header or body the schema refuses, "
                                              "or a body that cannot be read (not UTF-8, not JSON, broken multipart)."}
CAMPAIGN_RESPONSES = {401: _UNAUTHORIZED, 403: {"model": Problem, "description": "The role has no access to "
                                                                                 "campaigns (operations)."},
                      422: MALFORMED,
                      503: {"model": Problem, "description": "The read model is unavailable for now (Retry-After): "
                                                             "retry."}}
SETTINGS_RESPONSES = {401: _UNAUTHORIZED, 403: {"model": Problem, "description": "Only org_admin may use channel "
                                                                                 "settings."},
                      422: MALFORMED}
TOKENS_RESPONSES = {401: _UNAUTHORIZED, 403: {"model": Problem, "description": "Only org_admin (every role) and "
                                                                               "admin (campaigner tokens only) may "
                                                                               "manage API tokens."},
                    422: MALFORMED}
