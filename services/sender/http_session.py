"""The one aiohttp client session an HTTP provider adapter keeps: keep-alive, bounded concurrency, a
connect timeout apart from the read timeout (a connect failure is pre-send; a read timeout may have been
handed off), and the credentials in a default header only (never in a URL, a log or a result)."""
from __future__ import annotations

import aiohttp


class ProviderSession:
    def __init__(self, *, authorization: str, concurrency: int, connect_timeout_s: float, read_timeout_s: float,
                 keepalive_timeout_s: float):
        self._authorization = authorization
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect_timeout_s,
                                              sock_read=read_timeout_s)
        self._keepalive_timeout_s = keepalive_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the credentials
        return "ProviderSession()"

    def client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=self._concurrency,
                                             keepalive_timeout=self._keepalive_timeout_s)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout,
                headers={"Authorization": self._authorization, "Accept": "application/json",
                         "User-Agent": "outreach-sender"})
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
