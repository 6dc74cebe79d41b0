"""The HTTP API: the composition root (FastAPI app, its stores, the command publisher) and the entry point.

    python -m services.api      # serves at OUTREACH_API_HOST:OUTREACH_API_PORT (127.0.0.1:8080)

Reads come from the projections' read model, commands go to `outreach.commands`, tokens and channel settings
live in the event store's PostgreSQL database, or in `data_dir/api.db` (store.py). Interactive documentation at /docs, the OpenAPI document at /openapi.json.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from schemas.topics import MAX_RECORD_BYTES
from services.api import opt_outs, reads, settings_routes, tokens_routes, writes
from services.api.console import routes as console
from services.api.commands import BrokerUnavailable, CommandPublisher, InvalidCommand
from services.api.settings_publisher import SettingsPublisher
from services.api.store import ApiStore, CredentialsUnreadable
from services.common.observability import (HTTP_REQUEST_SECONDS, HTTP_REQUESTS, Observability, broker_check,
                                           metrics_text, read_model_check)
from services.common.settings import Settings, get_settings
from services.projections.views import ReadViews

MAX_JSON_BODY_BYTES = MAX_RECORD_BYTES
ANSWER_WAIT_ENV = "OUTREACH_API_ANSWER_WAIT_S"  # how long a write route waits for its command's answer

log = logging.getLogger("outreach.api")

DESCRIPTION = """Campaigns, messages, export, live progress and commands of Outreach.

Authenticate with `Authorization: Bearer <token>` (tokens: `outreach token create NAME --role ROLE`, or
`POST /tokens`). Roles: org_admin, admin and campaigner use campaigns; channel settings are org_admin only;
tokens: org_admin manages every role's, admin campaigner tokens only; operations has no access. Missing or
unknown token: 401; wrong role: 403.

Commands are published to `outreach.commands`, and the request waits (up to the contract's 5 seconds) for the
command handler's answer: a `CommandRejected` is answered 404 (unknown_campaign), 409 (the campaign's state:
campaign_exists, campaign_not_ready, campaign_not_running, not_editable, not_deletable, not_retryable,
contacts_closed, too_many_contacts, channel_busy) or 422 (invalid_command, disclaimer_not_accepted,
stop_not_confirmed, no_valid_contacts, attachments_not_ready, nothing_to_retry) with its `reason` and `detail`;
an accepted command 202 with `state: answered` and its answer events; a command not answered within the wait
202 with `state: pending` and its `command_id`, whose answer is at `GET /commands/{command_id}`. A malformed body
(not UTF-8, not JSON, not the schema), id or header is 422 at once, and nothing is published.
Send a command with an `Idempotency-Key` header to make retrying it safe: the same key publishes the same
command_id, which the handler acts on once.
"""


def answer_wait_from_environment() -> float:
    """`OUTREACH_API_ANSWER_WAIT_S` (seconds, 0 to 60; default 5): how long a command route waits for the answer."""
    raw = os.environ.get(ANSWER_WAIT_ENV, "").strip()
    value = float(raw) if raw else writes.DEFAULT_ANSWER_WAIT_S
    if not 0 <= value <= writes.MAX_WAIT_S:
        raise ValueError(f"{ANSWER_WAIT_ENV}={raw!r}: from 0 to {writes.MAX_WAIT_S:g} seconds")
    return value


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> list[str]:
    """Every method some route of the app answers on the request's path (a path can have a route per method, in
    different routers), asked of the app's own routing."""
    def answers(method: str) -> bool:
        probe = {**scope, "method": method}
        return any(route.matches(probe)[0] == Match.FULL for route in app.router.routes)

    return [method for method in HTTP_METHODS if answers(method)]


class HttpMetrics:
    """ASGI middleware: `outreach_http_requests_total` and `outreach_http_request_duration_seconds` by route
    template (never the raw path). Plain ASGI, so streamed answers (SSE, CSV) pass through untouched."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, code = time.perf_counter(), [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                code[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            HTTP_REQUESTS.labels("api", scope["method"], route, str(code[0])).inc()
            HTTP_REQUEST_SECONDS.labels("api", scope["method"], route).observe(time.perf_counter() - started)


def create_app(settings: Settings | None = None, *, read_model: Any = None, store: ApiStore | None = None,
               publisher: CommandPublisher | None = None, answer_wait_s: float | None = None,
               metrics_server: bool = False) -> FastAPI:
    """The app; what is not given is opened from the settings when the app starts (and closed when it stops).
    `answer_wait_s`: how long a command route waits for the handler's answer (default: the environment's
    OUTREACH_API_ANSWER_WAIT_S, else 5 s; 0 answers 202 pending at once, as tests without a handler want)."""
    settings = settings or get_settings()
    if answer_wait_s is None:
        answer_wait_s = answer_wait_from_environment()
    # /metrics and /readyz (ready: the broker and the read model answer); with `metrics_server` (the process's
    # entry point) also on the metrics port, recorded in data_dir/instances/ (API instances share their port).
    observability = Observability(settings, "api", {"broker": broker_check(settings),
                                                    "read_model": read_model_check(settings)})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned: list[Any] = []
        app.state.settings = settings
        app.state.answer_wait_s = answer_wait_s
        app.state.read_model = read_model
        if app.state.read_model is None:
            app.state.read_model = ReadViews.open(settings)
            owned.append(app.state.read_model)
        app.state.store = store
        if app.state.store is None:
            app.state.store = ApiStore.open(settings)
            owned.append(app.state.store)
        app.state.publisher = publisher or CommandPublisher(settings)
        app.state.settings_publisher = SettingsPublisher(app.state.store, app.state.publisher)
        # In the background: the API serves reads while the broker is away.
        republish = asyncio.create_task(app.state.settings_publisher.republish_stored())
        if metrics_server:
            await observability.start()
        try:
            yield
        finally:
            if metrics_server:
                await observability.stop()
            republish.cancel()
            await asyncio.gather(republish, return_exceptions=True)
            if publisher is None:
                await app.state.publisher.stop()
            for resource in owned:
                resource.close()

    # Bodies are capped before they are read (FastAPI reads a body before its auth dependency runs, so an
    # uncapped body would let anyone fill memory or disk): a command cannot exceed a Kafka record anyway;
    # the CSV upload route sets its own, larger cap.
    app = FastAPI(title="Outreach API", version="1", description=DESCRIPTION, lifespan=lifespan,
                  max_body_size=MAX_JSON_BODY_BYTES,
                  openapi_tags=[
                      {"name": "campaigns", "description": "Campaigns and their live counts."},
                      {"name": "messages", "description": "Messages: filters, search, pagination, CSV export."},
                      {"name": "progress", "description": "Live progress (Server-Sent Events)."},
                      {"name": "history", "description": "The ordered audit history."},
                      {"name": "commands", "description": "Commands published to outreach.commands, and answers."},
                      {"name": "opt-outs", "description": "Each channel's opt-out list: read, added to by hand, "
                                                          "removed from by an org admin with a reason."},
                      {"name": "settings", "description": "Channel settings (org_admin only)."},
                      {"name": "tokens", "description": "API tokens (org_admin: every role; admin: campaigner "
                                                        "tokens)."},
                  ])
    app.include_router(reads.router)
    app.include_router(writes.router)
    app.include_router(opt_outs.router)
    app.include_router(settings_routes.router)
    app.include_router(tokens_routes.router)
    console.mount(app, settings)  # the web console's pages under /console (outside the OpenAPI document)

    @app.get("/healthz", tags=["health"], summary="Liveness (no authentication)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # Operators' endpoints, outside the OpenAPI document (README, "Operating"); no authentication, as /healthz.
    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ready, report = await observability.readiness()
        return JSONResponse({"ready": ready, "service": "api", "checks": report}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = metrics_text()
        return Response(body, media_type=content_type)

    app.add_middleware(HttpMetrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == status.HTTP_400_BAD_REQUEST:
            # Starlette's and FastAPI's word for a body they cannot parse (not UTF-8, broken multipart): the
            # request is malformed, which this API answers 422 everywhere (documented), never 400.
            return JSONResponse({"detail": f"the request body cannot be read: {exc.detail}"},
                                status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
        if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
            # Starlette's Allow names the methods of the first route on the path only; a path here has one
            # route per method (GET and DELETE /campaigns/{id}), so every route of the path is asked.
            allow = ", ".join(allowed_methods(request.app, request.scope))
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers={"Allow": allow})
        return await http_exception_handler(request, exc)

    @app.exception_handler(InvalidCommand)
    async def invalid_command(_: Request, exc: InvalidCommand) -> JSONResponse:
        return JSONResponse({"detail": exc.errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(BrokerUnavailable)
    async def broker_unavailable(_: Request, exc: BrokerUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"the broker did not acknowledge the command: {exc}"},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        read_model = getattr(request.app.state, "read_model", None)
        if read_model is not None and hasattr(read_model, "is_unavailable") and read_model.is_unavailable(exc):
            log.warning("read model unavailable: %s", exc)
            return JSONResponse({"detail": "the read model is unavailable for now; retry"},
                                status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "1"})
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)

    @app.exception_handler(CredentialsUnreadable)
    async def credentials_unreadable(_: Request, exc: CredentialsUnreadable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)

    return app


def uvicorn_config(settings: Settings, app: FastAPI | None = None, **overrides: Any) -> uvicorn.Config:
    # log_config and log_level None: uvicorn's loggers keep the process's configuration (services/common/logs.py)
    options: dict[str, Any] = dict(host=settings.api_host, port=settings.api_port, log_config=None, log_level=None,
                                   access_log=False, timeout_graceful_shutdown=5, lifespan="on")
    options.update(overrides)
    return uvicorn.Config(app or create_app(settings), **options)


def main() -> None:
    """uvicorn's own server loop: it stops cleanly on SIGTERM / SIGINT (open SSE streams are closed)."""
    from services.common import logs
    from services.common.runtime import settings_or_exit

    logs.configure("api")

    settings = settings_or_exit()  # a refused value (OUTREACH_DEFAULT_REGION...): exit 78, not a crash loop
    log.info("HTTP API on http://%s:%d (docs at /docs)", settings.api_host, settings.api_port)
    uvicorn.Server(uvicorn_config(settings, create_app(settings, metrics_server=True))).run(sockets=[shared_listening_socket(settings.api_host,
                                                                                 settings.api_port)])


def shared_listening_socket(host: str, port: int) -> socket.socket:
    """The API's port, bound with SO_REUSEPORT: several API processes on one machine share it (the kernel
    spreads the connections); their state (tokens, settings) is shared in PostgreSQL."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class BackgroundServer:
    """The API served by uvicorn in a thread of this process (tests, embedding); `with` starts and stops it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        from services.common.embedded_broker import free_port

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                    access_log=False, lifespan="on", timeout_graceful_shutdown=2))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30) -> BackgroundServer:
        self._thread = threading.Thread(target=self.server.run, name="outreach-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
