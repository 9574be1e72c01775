"""Bounded by bytes: request bodies over their limit are a 413 problem (declared or streamed), a
large CSV import runs off the event loop (/health answers while it runs), and a large bad CSV
costs the API a bounded amount of memory and answers with a capped error list.

The last two run the API as its own process (`iotjx api`) and talk to it over HTTP with httpx, so
that its event loop and its memory are the real ones."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.helpers import bearer

HEADER = b"device_id,model,network,city,site_kind,site_name\n"


def _rows(n: int, good: bool = True, start: int = 0) -> Iterator[bytes]:
    """CSV lines in chunks of 1,000: valid water meters, or lines with an unknown model and city."""
    model, city = (b"cjt188-nb-water-std", b"Ganzhou") if good else (b"no-such-model", b"Atlantis")
    for first in range(start, start + n, 1000):
        yield b"".join(b"86997%010d,%s,nbiot,%s,residential,site %d\n" % (i, model, city, i % 500)
                       for i in range(first, min(first + 1000, start + n)))


def test_bodies_over_their_limit_are_a_413_problem(settings, keys):
    small = settings.model_copy(update={"api_max_body": 2048, "api_max_import_bytes": 8192})
    admin = bearer(keys.admin)
    device = {"device_id": "869975030000018", "model": "cjt188-nb-water-std", "network": "nbiot", "city": "鹰潭",
              "site_kind": "residential", "site_name": "x" * 3000}
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        declared = client.post("/devices", json=device, headers=admin)
        streamed = client.post("/devices", content=iter([b'{"device_id": "', b"8" * 4000, b'"}']),
                               headers={**admin, "content-type": "application/json"})
        note = client.put("/targets/5g-base-stations/progress", json={"value": 1, "note": "n" * 10_000_000},
                          headers=admin)
        csv_declared = client.post("/devices/bulk", content=HEADER + b"".join(_rows(200)), headers=admin)
        csv_streamed = client.post("/devices/bulk", content=iter([HEADER, *_rows(200)]), headers=admin)
        fits = client.post("/devices/bulk", content=HEADER + b"".join(_rows(60)), headers=admin)   # 4 KB > 2 KB
        anonymous = client.post("/devices/bulk", content=HEADER + b"".join(_rows(200)))
        bad_length = client.post("/devices", content=b"{}", headers={**admin, "content-length": "-1"})
    for r in (declared, streamed, note, csv_declared, csv_streamed):
        assert r.status_code == 413, r.text
        assert r.headers["content-type"] == "application/problem+json"
    assert "2048 bytes" in declared.json()["detail"] and "8192 bytes" in csv_streamed.json()["detail"]
    assert fits.status_code == 200 and fits.json()["created"] == 60
    assert anonymous.status_code == 401                  # who is asking comes before what is sent
    assert bad_length.status_code == 400
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api_process(settings):
    """`iotjx api` on a spare port, with a 64 MiB import limit; yields (base URL, its psutil.Process)."""
    port = _free_port()
    env = {**os.environ, "IOTJX_DATABASE_URL": settings.database_url, "IOTJX_API_BIND": f"127.0.0.1:{port}",
           "IOTJX_API_MAX_IMPORT_BYTES": str(64 << 20), "IOTJX_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "iotjx.cli", "api"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"the API did not start: {proc.stderr.read().decode()[-2000:]}")
    try:
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_health_answers_while_a_large_import_runs(api_process, keys, settings):
    url, _ = api_process
    rows = 100_000
    events: list[str] = []
    uploaded = threading.Event()
    answer: dict[str, httpx.Response] = {}

    def body() -> Iterator[bytes]:
        yield HEADER
        yield from _rows(rows)
        uploaded.set()              # httpx asks for more only once the last chunk is written

    def run_import() -> None:
        answer["import"] = httpx.post(f"{url}/devices/bulk", content=body(), headers=bearer(keys.admin),
                                      timeout=600)
        events.append("import answered")

    importer = threading.Thread(target=run_import)
    importer.start()
    assert uploaded.wait(300)
    health = httpx.get(f"{url}/health", headers=bearer(keys.viewer), timeout=600)
    events.append("health answered")
    importer.join(600)
    assert health.status_code == 200 and health.json()["database"]["reachable"]
    assert answer["import"].status_code == 200, answer["import"].text[:500]
    assert answer["import"].json() == {"created": rows, "updated": 0, "sites": 500, "catalogue_sites": 0,
                                         "unverified_sites": 500, "skipped": 0, "errors": [], "errors_total": 0}
    assert events == ["health answered", "import answered"]
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == rows


def test_a_large_bad_csv_costs_bounded_memory_and_a_capped_error_list(api_process, keys):
    url, process = api_process
    warm = httpx.post(f"{url}/devices/bulk", content=HEADER + b"".join(_rows(10, good=False)),
                      headers=bearer(keys.admin), timeout=60)
    assert warm.status_code == 422
    rows = 500_000                               # ~32 MB of CSV, two errors a line
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = httpx.post(f"{url}/devices/bulk", content=iter([HEADER, *_rows(rows, good=False)]),
                       headers=bearer(keys.admin), timeout=600)
    finally:
        done.set()
        watcher.join()
    assert r.status_code == 422
    body = r.json()
    assert len(body["errors"]) == 100 and body["errors_shown"] == 100
    assert body["errors_total"] == 2 * rows
    assert {e["line"] for e in body["errors"]} == set(range(2, 52))
    assert len(r.content) < 64_000
    growth = peak - baseline
    print(f"API RSS {baseline / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB during a {rows}-line bad CSV")
    assert growth < 150 * 2**20, f"the API grew {growth / 2**20:.0f} MiB"
