"""Request bodies are capped before they are read, with or without a token (real HTTP, uvicorn)."""
from __future__ import annotations

import uuid

import httpx
import psutil
import pytest

from services.api.app import MAX_JSON_BODY_BYTES, BackgroundServer, create_app
from services.api.contacts_upload import MAX_UPLOAD_BYTES
from services.api.store import ApiStore
from services.common.settings import Settings


@pytest.fixture(scope="module")
def server(tmp_path_factory, kafka_bootstrap):
    settings = Settings(data_dir=tmp_path_factory.mktemp("api-limits"), kafka_bootstrap_servers=kafka_bootstrap)
    with ApiStore.open(settings) as store:
        token = store.create_token("ada", "admin")[0]
    with BackgroundServer(create_app(settings, answer_wait_s=0)) as running:
        running.token = token
        yield running


def chunks(total: int, size: int = 1024 * 1024):
    """A body streamed in pieces, so the client never holds it whole."""
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b"x" * piece


@pytest.mark.parametrize("with_token", [False, True])
def test_an_oversized_json_body_is_refused_413_without_being_read(server, with_token):
    headers = {"Content-Type": "application/json"}
    if with_token:
        headers["Authorization"] = f"Bearer {server.token}"
    rss_before = psutil.Process().memory_info().rss
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post(f"/campaigns/{uuid.uuid4()}/run", headers=headers,
                               content=chunks(64 * MAX_JSON_BODY_BYTES))
    assert response.status_code == 413
    # The server runs in this process: 64 MiB read into memory would show.
    assert psutil.Process().memory_info().rss - rss_before < 32 * 1024 * 1024


def test_an_upload_over_the_csv_limit_is_refused_413_before_it_is_stored(server):
    def upload():
        yield (b'--limit\r\nContent-Disposition: form-data; name="contacts"; filename="c.csv"\r\n'
               b"Content-Type: text/csv\r\n\r\n")
        yield from chunks(MAX_UPLOAD_BYTES + 4 * 1024 * 1024)
        yield b"\r\n--limit--\r\n"

    headers = {"Authorization": f"Bearer {server.token}", "Content-Type": "multipart/form-data; boundary=limit"}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post("/campaigns", headers=headers, content=upload())
    assert response.status_code == 413


def test_a_body_under_the_cap_still_reaches_its_checks(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post(f"/campaigns/{uuid.uuid4()}/run", json={"disclaimer": {}})
    assert response.status_code == 401  # read, then refused by the auth dependency as before
