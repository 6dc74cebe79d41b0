"""The CLI's client of the HTTP API (httpx): the campaign commands go through the API's routes with the bearer
token of `outreach login` (outreach/config.py), so they work from any folder or machine and the audit trail
names the token's principal.

    with ApiClient.from_config() as api:
        page = api.list_campaigns()
        answer = api.run(campaign_id)           # 202 answered / pending (then api.wait_answer)

Every method returns the decoded JSON body of a 2xx answer; any other status raises `ApiError` with the
status and the body (a rejection's body names its reason); an unreachable API raises `ApiUnreachable`.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from outreach.config import ApiTarget, api_target

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0  # a create streams a CSV of up to 50 MB and waits for the handler's answers
ANSWER_WAIT_S = 30.0  # the most the API waits in one GET /commands/ID?wait= (its limit is 60)
ALL_DISCLAIMER_FLAGS = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}

# transport for tests (httpx.MockTransport); None: the network
TRANSPORT: httpx.BaseTransport | None = None


class ApiError(RuntimeError):
    """A non-2xx answer: `status` and the decoded `body` (a dict when the API sent JSON)."""

    def __init__(self, status: int, body: Any, what: str):
        self.status = status
        self.body = body
        detail = body.get("detail") if isinstance(body, dict) else body
        if not isinstance(detail, str):
            detail = json.dumps(detail, default=str)[:500]
        super().__init__(f"{what}: HTTP {status}: {detail}")

    @property
    def reason(self) -> str | None:
        return self.body.get("reason") if isinstance(self.body, dict) else None


class ApiUnreachable(RuntimeError):
    """The API does not answer (wrong URL, stack not running)."""


class ApiClient:
    def __init__(self, target: ApiTarget, *, transport: httpx.BaseTransport | None = None):
        self.target = target
        self._http = httpx.Client(
            base_url=target.url, transport=transport or TRANSPORT,
            headers={"Authorization": f"Bearer {target.token}", "User-Agent": "outreach-cli"},
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    @classmethod
    def from_config(cls) -> ApiClient:
        return cls(api_target())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- plumbing

    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> tuple[int, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"the API at {self.target.url} does not answer ({type(exc).__name__}: {exc}); "
                                 "is the stack running, and is the URL right?") from None
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if not response.is_success:
            raise ApiError(response.status_code, body, what)
        return response.status_code, body

    def _get(self, path: str, what: str, **params: Any) -> Any:
        return self._request("GET", path, what, params={k: v for k, v in params.items() if v is not None})[1]

    # -------------------------------------------------------------- reads

    def whoami_check(self) -> None:
        """Any authenticated read: raises ApiError 401/403 when the token is not accepted."""
        self._get("/campaigns", "checking the token", limit=1)

    def list_campaigns(self, page_size: int = 1000) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = self._get("/campaigns", "listing campaigns", limit=page_size, offset=len(items))
            items += page["items"]
            if not page["items"] or len(items) >= page["total"]:
                return items

    def campaign(self, campaign_id: str, as_of: str | None = None) -> dict[str, Any] | None:
        """The campaign, or None if the API does not know it (404)."""
        try:
            return self._get(f"/campaigns/{campaign_id}", f"reading campaign {campaign_id}", as_of=as_of)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def history(self, campaign_id: str, *, include_messages: bool = True,
                as_of: str | None = None) -> list[dict[str, Any]] | None:
        try:
            return self._get(f"/campaigns/{campaign_id}/history", f"reading the history of {campaign_id}",
                             include_messages=str(include_messages).lower(), as_of=as_of)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def iter_messages(self, campaign_id: str, as_of: str | None = None, page_size: int = 1000
                      ) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = self._get(f"/campaigns/{campaign_id}/messages", f"reading the messages of {campaign_id}",
                             as_of=as_of, limit=page_size, offset=offset)
            yield from page["items"]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return

    # -------------------------------------------------------------- commands

    def wait_answer(self, accepted: dict[str, Any], command_id: str | None = None,
                    timeout_s: float = ANSWER_WAIT_S) -> list[dict[str, Any]]:
        """The answer events of a pending command (GET /commands/ID?wait=), [] if none within `timeout_s`."""
        command_id = command_id or accepted["command_id"]
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            status, body = self._request("GET", f"/commands/{command_id}", f"waiting for {command_id}",
                                         params={"wait": min(left, ANSWER_WAIT_S)})
            if status == 200:
                return body["events"]

    def _command(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        """A command route: the 202 body, or a rejection's body (404/409/422 with a `reason` and `events`)."""
        try:
            return self._request(method, path, what, **kwargs)[1]
        except ApiError as exc:
            if isinstance(exc.body, dict) and exc.body.get("state") == "rejected":
                return exc.body
            raise

    def create(self, csv_path: Path, *, name: str, channel: str, template: dict[str, Any],
               description: str | None = None, destination_column: str | None = None,
               default_region: str | None = None) -> dict[str, Any]:
        data = {"name": name, "channel": channel, "template": json.dumps(template), "consent_confirmed": "true"}
        for key, value in (("description", description), ("destination_column", destination_column),
                           ("default_region", default_region)):
            if value is not None:
                data[key] = value
        with open(csv_path, "rb") as f:
            return self._command("POST", "/campaigns", "creating the campaign", data=data,
                                 files={"contacts": (Path(csv_path).name, f, "text/csv")})

    def run(self, campaign_id: str) -> dict[str, Any]:
        return self._command("POST", f"/campaigns/{campaign_id}/run", f"running {campaign_id}",
                             json={"disclaimer": dict(ALL_DISCLAIMER_FLAGS)})

    def stop(self, campaign_id: str) -> dict[str, Any]:
        return self._command("POST", f"/campaigns/{campaign_id}/stop", f"stopping {campaign_id}",
                             json={"confirmed": True})

    def retry(self, campaign_id: str, message_ids: list[str] | None, include_cancelled: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"include_cancelled": include_cancelled}
        if message_ids:
            body["message_ids"] = list(message_ids)
        return self._command("POST", f"/campaigns/{campaign_id}/retry", f"retrying {campaign_id}", json=body)

    def delete(self, campaign_id: str) -> dict[str, Any]:
        return self._command("DELETE", f"/campaigns/{campaign_id}", f"deleting {campaign_id}")
