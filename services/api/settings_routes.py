"""Channel settings endpoints (org_admin only): provider choice and write-only credentials."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status

from services.api import channel_settings
from services.api.auth import SETTINGS_RESPONSES, OrgAdmin
from services.api.commands import BrokerUnavailable
from services.api.models import ChannelSettingsView, EmailChannelSettingsBody, SmsChannelSettingsBody
from services.common import safe_defaults
from services.common.channel_settings import SettingsError, check, overrides


@asynccontextmanager
async def refuse_unsafe_defaults(app: Any) -> AsyncIterator[None]:
    """The API does not start with settings its services would refuse (services/common/safe_defaults.py): a
    real provider endpoint while a secret keeps its public development value. Part of the app's lifespan
    (after the app's own, which sets `app.state.settings`)."""
    settings = getattr(app.state, "settings", None)
    if settings is not None:
        safe_defaults.check(settings, doing="the API refuses to start")
    yield


router = APIRouter(prefix="/settings", tags=["settings"], responses=SETTINGS_RESPONSES,
                   lifespan=refuse_unsafe_defaults)

_PUT_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"description": "Credentials malformed, or a real provider endpoint (not the simulator's) while a secret "
                         "keeps its public development value (the detail names each setting to set)."},
    503: {"description": "The broker did not acknowledge the change: the settings are stored and published when "
                         "the API next starts (or with the next PUT)."}}
_BODIES = {"sms": SmsChannelSettingsBody, "email": EmailChannelSettingsBody}


async def _view(request: Request, channel: str) -> dict[str, Any]:
    stored = await asyncio.to_thread(request.app.state.store.channel_settings, channel)
    if stored is None:
        return channel_settings.environment_view(channel, request.app.state.settings)
    return channel_settings.masked_view(stored, stored.settings_id in request.app.state.settings_publisher.published)


async def replace_channel_settings(request: Request, principal: Any, channel: str, body: Any) -> dict[str, Any]:
    """A channel's new provider and credentials, checked, stored and published, as `principal` (the PUT below,
    and the console's Settings form). HTTPException 422 (refused, `detail` says why) or 503 (stored, not
    acknowledged by the broker)."""
    provider = body.provider
    try:
        credentials = check(channel, provider, body.credentials.model_dump(exclude_none=True))
        overrides(channel, provider, credentials)  # what the sender would refuse
    except SettingsError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    # A real provider with the public development secrets: what the services would refuse (safe_defaults).
    unsafe = await asyncio.to_thread(channel_settings.unsafe_with, request.app.state.settings, channel,
                                     provider, credentials, request.app.state.store.channel_settings)
    if unsafe:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=unsafe)
    try:
        stored = await request.app.state.settings_publisher.save_and_publish(channel, provider, credentials,
                                                                             principal.name)
    except BrokerUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            detail=f"the settings are stored but the broker did not acknowledge them: {exc}") from None
    return channel_settings.masked_view(stored, applied=True)


def _routes_for(channel: str) -> None:
    """GET and PUT /settings/channels/{channel} for one channel: one route per channel, so the body schema is
    the channel's own (which providers, which credential fields)."""
    body_type = _BODIES[channel]

    async def get_settings(request: Request, _: OrgAdmin) -> dict[str, Any]:
        return await _view(request, channel)

    async def put_settings(request: Request, principal: OrgAdmin, body: Any) -> dict[str, Any]:
        return await replace_channel_settings(request, principal, channel, body)

    put_settings.__annotations__["body"] = body_type  # the channel's own (annotations are strings here)

    router.add_api_route(f"/channels/{channel}", get_settings, methods=["GET"], response_model=ChannelSettingsView,
                         name=f"get_{channel}_settings",
                         summary=f"The {channel} channel's provider settings (credentials masked)")
    router.add_api_route(f"/channels/{channel}", put_settings, methods=["PUT"], response_model=ChannelSettingsView,
                         name=f"put_{channel}_settings", responses=_PUT_RESPONSES,
                         summary=f"Choose the {channel} channel's provider and set its credentials (write-only, "
                                 "stored encrypted)",
                         description="Replaces the channel's provider and credentials as a whole.")


for _channel in _BODIES:
    _routes_for(_channel)
