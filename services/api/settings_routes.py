"""Channel settings endpoints (org_admin only): provider choice and write-only credentials."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, status

from schemas.commands import Channel
from services.api import channel_settings
from services.api.auth import SETTINGS_RESPONSES, OrgAdmin
from services.api.commands import BrokerUnavailable
from services.api.models import ChannelSettingsBody, ChannelSettingsView
from services.common import safe_defaults
from services.common.channel_settings import PROVIDERS, SettingsError, check, overrides


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

ChannelPath = Annotated[Channel, Path(description="sms or email")]


@router.get("/channels/{channel}", response_model=ChannelSettingsView, summary="A channel's provider settings "
            "(credentials masked)")
async def get_channel_settings(request: Request, _: OrgAdmin, channel: ChannelPath) -> dict[str, Any]:
    stored = await asyncio.to_thread(request.app.state.store.channel_settings, channel)
    if stored is None:
        return channel_settings.environment_view(channel, request.app.state.settings)
    return channel_settings.masked_view(stored, stored.settings_id in request.app.state.settings_publisher.published)


@router.put("/channels/{channel}", response_model=ChannelSettingsView, summary="Choose a channel's provider and "
            "set its credentials (write-only, stored encrypted)",
            description="Replaces the channel's provider and credentials as a whole. Providers and their credential "
                        "fields (required; optional): " + "; ".join(
                            f"{channel}/{provider}: {list(required)}; {list(optional)}"
                            for channel, providers in PROVIDERS.items()
                            for provider, (required, optional) in providers.items()),
            responses={422: {"description": "Unknown provider, or credentials missing / not expected, or a real "
                                            "provider endpoint (not the simulator's) while a secret keeps its "
                                            "public development value (the detail names each setting to set)."},
                       503: {"description": "The broker did not acknowledge the change: the settings are stored "
                                            "and published when the API next starts (or with the next PUT)."}})
async def put_channel_settings(request: Request, principal: OrgAdmin, channel: ChannelPath,
                               body: ChannelSettingsBody) -> dict[str, Any]:
    try:
        credentials = check(channel, body.provider, body.credentials)
        overrides(channel, body.provider, credentials)  # what the sender would refuse (a port that is no number)
    except SettingsError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
    # A real provider with the public development secrets: what the services would refuse (safe_defaults).
    unsafe = await asyncio.to_thread(channel_settings.unsafe_with, request.app.state.settings, channel,
                                     body.provider, credentials, request.app.state.store.channel_settings)
    if unsafe:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=unsafe)
    try:
        stored = await request.app.state.settings_publisher.save_and_publish(channel, body.provider, credentials,
                                                                             principal.name)
    except BrokerUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            detail=f"the settings are stored but the broker did not acknowledge them: {exc}") from None
    return channel_settings.masked_view(stored, applied=True)
