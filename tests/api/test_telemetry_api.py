"""GET /devices/{id}/telemetry and /sites/{id}/telemetry against the real database: the series equal
plain SQL over the readings (from the rollup and from the readings alike), city scopes hide other
cities' devices and sites, and bad questions are 422 problems."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.model import Uplink
from tests.helpers import bearer
from tests.ingest.test_rollups_written import _water

TZ = ZoneInfo("Asia/Shanghai")
SITE = {"site_id": "JX-RS-0101", "city": "鹰潭", "kind": "residential", "name": "龙岗小区"}
METERS = ("869975030101001", "869975030101002")


@pytest.fixture
def stored(settings, keys):
    """Two meters on a Yingtan catalogue site, a reading every 40 min for 3 days."""
    with TestClient(create_app(settings), headers=bearer(keys.admin), raise_server_exceptions=False) as client:
        assert client.post("/sites", json=SITE).status_code == 201
        for m in METERS:
            r = client.post("/devices", json={"device_id": m, "model": "cjt188-nb-water-std", "site_id": SITE["site_id"],
                                              "installed_at": (datetime.now(TZ) - timedelta(days=10)).isoformat()})
            assert r.status_code in (200, 201), r.text
    url = settings.database_url
    now = datetime.now(TZ).replace(microsecond=0)
    ups = []
    for k, m in enumerate(METERS):
        for i in range(3 * 36):
            at = now - timedelta(minutes=40 * i + 7 * k)
            ups.append(Uplink(m, _water(at, 100.0 + k * 50 + (3 * 36 - i) * 0.013, f"{k + 1:014d}"), "mqtt",
                              at.timestamp() + 3))
    Pipeline(DeviceRegistry(lambda: connect(url)), Writer(lambda: connect(url))).process(ups)
    midnight = now.replace(hour=0, minute=0, second=0)
    return url, midnight - timedelta(days=3), midnight + timedelta(days=1)


def _get(client, path, **params):
    return client.get(path, params={k.rstrip("_"): v.isoformat() if isinstance(v, datetime) else v
                                    for k, v in params.items()})


def test_a_meters_daily_maximum_and_a_sites_hourly_count_equal_plain_sql(stored, settings, keys):
    url, since, until = stored
    with TestClient(create_app(settings), headers=bearer(keys.viewer)) as client:
        r = _get(client, f"/devices/{METERS[0]}/telemetry", from_=since, to=until, interval="1d", agg="max",
                 fields="flow_m3")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
        got = r.json()
        assert got["sources"] == {"flow_m3": "rollup:rollup_water_day"} and got["device_id"] == METERS[0]
        readings = _get(client, f"/devices/{METERS[0]}/telemetry", from_=since, to=until, interval="1d", agg="max",
                        fields="flow_m3", source="readings").json()
        assert readings["sources"] == {"flow_m3": "readings:water_readings"}
        assert readings["points"] == got["points"]
        site = _get(client, f"/sites/{SITE['site_id']}/telemetry", from_=since, to=until, interval="1h", agg="count",
                    fields="flow_m3,battery_low").json()
    with psycopg.connect(url) as conn:
        plain = conn.execute("""SELECT date_trunc('day', meter_time AT TIME ZONE 'Asia/Shanghai'), max(flow_m3)
                                  FROM water_readings WHERE device_id = %s GROUP BY 1 ORDER BY 1""",
                             (METERS[0],)).fetchall()
        hourly = conn.execute("""SELECT date_trunc('hour', meter_time AT TIME ZONE 'Asia/Shanghai'), count(flow_m3),
                                        count(battery_low)
                                   FROM water_readings GROUP BY 1 ORDER BY 1""").fetchall()
    assert [(datetime.fromisoformat(p["t"]).replace(tzinfo=None), p["values"]["flow_m3"]) for p in got["points"]] \
        == [(d, pytest.approx(v)) for d, v in plain] and len(plain) >= 3
    assert site["sources"] == {"flow_m3": "readings:water_readings", "battery_low": "rollup:rollup_water_site_15m"}
    assert [(datetime.fromisoformat(p["t"]).replace(tzinfo=None), p["values"]["flow_m3"], p["values"]["battery_low"])
            for p in site["points"]] == [(h, float(a), float(b)) for h, a, b in hourly]


def test_other_cities_keys_see_neither_the_device_nor_the_site(stored, settings, keys):
    _, since, until = stored
    with TestClient(create_app(settings), headers=bearer(keys.nanchang_viewer), raise_server_exceptions=False) as c:
        for path in (f"/devices/{METERS[0]}/telemetry", f"/sites/{SITE['site_id']}/telemetry"):
            r = _get(c, path, from_=since, to=until)
            assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json", r.text
    with TestClient(create_app(settings), raise_server_exceptions=False) as anonymous:
        assert _get(anonymous, f"/devices/{METERS[0]}/telemetry", from_=since, to=until).status_code == 401


@pytest.mark.parametrize("params, says", [
    ({"from": "2026-12-01T00:00:00", "to": "2026-12-02T00:00:00+08:00"}, "offset"),
    ({"fields": "speed_kmh"}, "unknown field"),
    ({"fields": "flow_m3;drop table"}, "field names"),
    ({"interval": "2h"}, "interval"),
    ({"agg": "median"}, "agg"),
    ({"tz": "Mars/Olympus"}, "IANA"),
    ({"from": "2026-12-02T00:00:00+08:00", "to": "2026-12-01T00:00:00+08:00"}, "after"),
    ({"source": "cache"}, "source"),
])
def test_bad_questions_are_422_problems(stored, settings, keys, params, says):
    with TestClient(create_app(settings), headers=bearer(keys.viewer), raise_server_exceptions=False) as client:
        q = {"from": "2026-12-01T00:00:00+08:00", "to": "2026-12-02T00:00:00+08:00", **params}
        r = client.get(f"/devices/{METERS[0]}/telemetry", params=q)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
        assert says in r.text
    assert time.time()          # (no timing asserted)


def test_more_concurrent_streams_than_pool_connections_all_complete(stored, settings, keys):
    """16 telemetry requests at once over a real server (the pool has 8 connections): each is answered whole
    and equal to the one asked alone.  When a route held its request connection while its stream took a
    second one, 8 requests in flight each waited for another until the pool's 30 s timeout, and the answers
    were cut off (benchmarks/README.md "API latency at 10M readings")."""
    import socket
    import threading

    import httpx
    import uvicorn

    url, since, until = stored
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    paths = [f"/devices/{METERS[i % 2]}/telemetry" if i % 3 else f"/sites/{SITE['site_id']}/telemetry" for i in range(16)]
    params = {"from": since.isoformat(), "to": until.isoformat(), "interval": "5m", "agg": "avg",
              "fields": "flow_m3,battery_low"}
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, headers=bearer(keys.viewer), timeout=120) as client:
            alone = {p: client.get(p, params=params).json() for p in set(paths)}
        start, got = threading.Barrier(len(paths)), {}

        def one(i: int) -> None:
            with httpx.Client(base_url=base, headers=bearer(keys.viewer), timeout=120) as client:
                start.wait()
                r = client.get(paths[i], params=params)
                got[i] = (r.status_code, r.text)

        workers = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=150)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert sorted(got) == list(range(len(paths)))
    for i, (status, text) in got.items():
        assert status == 200, text[:300]
        assert json.loads(text) == alone[paths[i]] and alone[paths[i]]["points"], paths[i]
