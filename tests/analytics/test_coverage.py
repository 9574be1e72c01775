"""/coverage equals counts made directly in SQL on the same data (from the readings tables, not from
the device_state summary the report uses)."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import psycopg
import pytest
from fastapi.testclient import TestClient

import decoders
from api.app import create_app
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink
from simulators.fleet import imei
from tests.helpers import bearer, insert_key

LIVE_FACTOR = 1.5

# Independent: liveness from the newest stored reading in any readings table.
SQL_LIVE = """
    WITH last AS (
        SELECT device_id, max(time) AS t FROM (
            SELECT device_id, time FROM water_readings UNION ALL
            SELECT device_id, time FROM parking_events) r GROUP BY device_id),
    d AS (
        SELECT d.device_id, d.pilot, d.network, s.city_code, s.kind, s.site_id,
               d.status = 'active' AND last.t >= now() - (%(f)s * coalesce(d.reporting_interval_s, m.reporting_interval_s))
                                                         * interval '1 second' AS live
        FROM devices d JOIN device_models m ON m.model = d.model JOIN sites s ON s.site_id = d.site_id
        LEFT JOIN last ON last.device_id = d.device_id
        WHERE d.status <> 'retired')
"""


def _water_frame(rng: random.Random) -> bytes:
    return decoders.encode("cjt188", {"meter_address": f"{rng.randrange(10**14):014d}",
                                      "flow_m3": rng.randrange(10**6) / 100,
                                      "meter_time": datetime(2026, 11, 1, tzinfo=UTC)})


def _parking_frame(rng: random.Random) -> bytes:
    return decoders.encode("parking", {"frame_type": 0, "occupied": rng.random() < 0.5, "frame_counter": rng.randrange(256),
                                       "temperature_c": 20, "battery_mv": 3300,
                                       "mag_x": 10, "mag_y": 20, "mag_z": 30})


@pytest.fixture
def populated(db_url):
    """Devices in several cities, sites and networks; some reported recently, some days ago, some never."""
    rng = random.Random(11)
    records, plan = [], []
    cities = ["360100", "360600", "360700", "Jiujiang", "鹰潭"]
    for k in range(160):
        parking = k % 4 == 0
        kind = rng.choice(["scenic_spot", "parking_lot"]) if parking else rng.choice(["residential", "community"])
        device_id = imei(rng)
        # Both models are NB-IoT, which the registry now holds them to; the draw that once picked a
        # network for them is kept so that the rest of the fixture stays the same.
        rng.choice(["nbiot", "nbiot", "cat1"])
        records.append(DeviceRecord(
            device_id=device_id, model="nb-parking-sensor" if parking else "cjt188-nb-water-std",
            city=rng.choice(cities), site_kind=kind,
            site_name=f"site {rng.randrange(6)}", reporting_interval_s=3600,
            status="inactive" if rng.random() < 0.05 else "active"))
        plan.append((device_id, parking, rng.choice(["recent", "recent", "stale", "never"])))
    with psycopg.connect(db_url) as conn:
        register_devices(conn, records)
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url)))
    now = time.time()
    batch = []
    for device_id, parking, when in plan:
        if when == "never":
            continue
        received = now - 60 if when == "recent" else now - 3 * 86400
        payload = _parking_frame(rng) if parking else _water_frame(rng)
        batch.append(Uplink(device_id=device_id, payload=payload, transport="mqtt", received_at=received))
    pipeline.process(batch)
    assert pipeline.counters["stored"] == len(batch)
    return db_url


def test_coverage_equals_sql_counts(populated, settings):
    with TestClient(create_app(settings), headers=bearer(insert_key(settings.database_url, "admin"))) as client:
        body = client.get("/coverage").json()
    targets = {t["target_id"]: t for t in body["targets"]}
    with psycopg.connect(populated) as conn:
        def q(sql: str, **params):
            return conn.execute(SQL_LIVE + sql, {"f": LIVE_FACTOR, **params}).fetchone()[0]

        for tid in ("yingtan-water-nbiot", "nanchang-water-nbiot", "province-water-nbiot", "nanchang-traffic-cat1"):
            t = targets[tid]
            sql = "SELECT count(*) FROM d WHERE live AND pilot = %(p)s AND network = %(n)s"
            params = {"p": t["pilot"], "n": t["network"]}
            if t["city"] is not None:
                sql += " AND city_code = %(c)s"
                params["c"] = t["city"]
            expected = q(sql, **params)
            assert t["value"] == expected, tid
            if tid == "province-water-nbiot":
                assert expected > 0
            assert t["percent"] == pytest.approx(round(100 * expected / t["target"], 2)), tid
        scenic_live = q("SELECT count(DISTINCT site_id) FROM d WHERE kind = 'scenic_spot' AND pilot = 'traffic' AND live")
        scenic_all = conn.execute("SELECT count(*) FROM sites WHERE kind = 'scenic_spot'").fetchone()[0]
        assert scenic_all > 0 and 0 < scenic_live < scenic_all + 1
        assert targets["tourism-smart-parking"]["value"] == pytest.approx(100 * scenic_live / scenic_all)
        community = q("SELECT count(DISTINCT site_id) FROM d WHERE kind = 'community' AND live")
        assert community > 0
        assert targets["smart-community-models"]["value"] == community
        # the breakdown: registered and live per city × pilot × network
        rows = conn.execute(SQL_LIVE + """SELECT city_code, pilot, network, count(*), count(*) FILTER (WHERE live)
                                          FROM d GROUP BY 1, 2, 3""", {"f": LIVE_FACTOR}).fetchall()
    got = {(r["city"], r["pilot"], r["network"]): (r["registered"], r["live"]) for r in body["breakdown"]}
    assert got == {(c, p, n): (reg, live) for c, p, n, reg, live in rows}
    assert targets["5g-base-stations"]["value"] is None      # operator-entered, nothing entered yet


def test_operator_entered_progress_and_filters(populated, settings):
    with TestClient(create_app(settings), headers=bearer(insert_key(settings.database_url, "admin"))) as client:
        assert client.put("/targets/5g-base-stations/progress", json={"value": 12345}).status_code == 200
        assert client.put("/targets/yingtan-water-nbiot/progress", json={"value": 1}).status_code == 409
        assert client.put("/targets/no-such-target/progress", json={"value": 1}).status_code == 404
        body = client.get("/coverage").json()
        t = {x["target_id"]: x for x in body["targets"]}["5g-base-stations"]
        assert t["value"] == 12345 and t["percent"] == pytest.approx(100 * 12345 / 40000, abs=0.01)
        only = client.get("/coverage", params={"city": 360600, "pilot": "water"}).json()
        assert {x["city"] for x in only["breakdown"]} == {360600}
        assert all(x["pilot"] in (None, "water") and x["city"] in (None, 360600) for x in only["targets"])
        assert client.get("/coverage", params={"pilot": "gas"}).status_code == 422
