"""The traffic figure routes (api/routes/traffic.py): GB/T 43229 detector frames and parking sensor
reports stored through the real pipeline (so the lane rollup the route reads is the writer's), every
bucket and parking hour recomputed in plain SQL (tests/analytics/test_traffic.py's references), with an
unscoped viewer, a Nanchang key, a two-city key and no key (JSON and CSV)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import psycopg
import pytest

import decoders
from analytics.traffic import congestion_grade, los_band
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink
from tests.analytics.test_traffic import DAY, SEQUENCE, _at, _lane, _sql_buckets, _sql_occupancy
from tests.api.conftest import NANCHANG, YINGTAN
from tests.api.figures_world import module_world
from tests.helpers import store_uplinks

NC_DET, YT_DET = "det-bayi-01", "det-yt-01"
SINCE, UNTIL = DAY + timedelta(hours=7, minutes=45), DAY + timedelta(hours=8, minutes=45)


def _fill(db_url: str) -> None:
    installed = DAY - timedelta(days=1)
    detector = dict(model="gbt43229-detector", site_kind="intersection", installed_at=installed)
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [
            DeviceRecord(device_id=NC_DET, city="Nanchang", site_name="八一大道/中山路", **detector),
            DeviceRecord(device_id=YT_DET, city="Yingtan", site_name="胜利路/站江路", **detector),
            *[DeviceRecord(device_id=d, model="nb-parking-sensor", city="Nanchang", site_kind="parking_lot",
                           site_name="万寿宫停车场", installed_at=installed) for d in ("park-a", "park-b", "park-c")],
            DeviceRecord(device_id="park-s", model="nb-parking-sensor", city="Yingtan", site_kind="scenic_spot",
                         site_name="龙虎山", installed_at=installed)])
    rng = random.Random(7)
    uplinks = []
    times = [DAY + timedelta(hours=7, minutes=52, seconds=30 + 60 * k) for k in range(46)]
    for k, device in enumerate((NC_DET, YT_DET)):
        for n, at in enumerate(times):
            frame = decoders.encode("gbt43229", {"division_code": (NANCHANG, YINGTAN)[k], "device_type": 2,
                                                 "device_number": n, "lanes": [_lane(rng, c) for c in range(1, 3 + k)]})
            uplinks.append(Uplink(device_id=device, payload=frame, transport="mqtt", received_at=at.timestamp()))
    uplinks += [Uplink(device_id=d, payload=decoders.encode("parking", {
                    "frame_type": 0 if info else 1, "occupied": occupied, "frame_counter": k, "battery_mv": 3500,
                    "node_hour": at.hour, "node_minute": at.minute}), transport="coap", received_at=at.timestamp())
                for k, (d, at, occupied, info) in enumerate(SEQUENCE)]
    assert store_uplinks(db_url, uplinks)["stored"] == len(uplinks)


@pytest.fixture(scope="module")
def world(pg_admin_url, template_db, broker):
    yield from module_world(pg_admin_url, template_db, broker, _fill)


WINDOW = {"from": SINCE.isoformat(), "to": UNTIL.isoformat()}


@pytest.mark.parametrize("interval", ["5m", "15m"])
@pytest.mark.parametrize("per", ["lane", "detector"])
def test_flow_buckets_equal_the_sql_recount(world, interval, per):
    width = {"5m": 300, "15m": 900}[interval]
    with psycopg.connect(world.db_url) as conn:
        expected = _sql_buckets(conn, width // 60, per)
    got = world.items("/traffic/flow", interval=interval, per=per, **WINDOW)
    assert len(got) == len(expected) > 0
    assert [(b["device_id"], b["lane"] or -1, b["start"]) for b in got] \
        == sorted((b["device_id"], b["lane"] or -1, b["start"]) for b in got)
    for b in got:
        start = datetime.fromisoformat(b["start"])
        frames, lanes, a, bb, c, n, occ, v_t, v_s = expected[(b["device_id"], b["lane"], start)]
        assert (b["frames"], b["lanes"], b["count_a"], b["count_b"], b["count_c"], b["volume"]) == (frames, lanes, a, bb, c, n)
        assert b["occupancy_pct"] == pytest.approx(occ)
        assert b["time_mean_kmh"] == pytest.approx(v_t) and b["space_mean_kmh"] == pytest.approx(v_s)
        assert b["flow_vph"] == pytest.approx(n * 3600 / width)
        if n:
            assert b["density_vpkmpl"] == pytest.approx(b["flow_vph"] / v_s / lanes)
            assert b["los"] == los_band(b["density_vpkmpl"]) and b["grade"] == congestion_grade(v_s, "arterial")
        assert b["city"] == (NANCHANG if b["device_id"] == NC_DET else YINGTAN)
        assert start.utcoffset() == timedelta(hours=8) and start.minute % (width // 60) == 0
    lines = world.csv("/traffic/flow.csv", interval=interval, per=per, **WINDOW)
    assert [(r["device_id"], r["start"], int(r["volume"])) for r in lines] \
        == [(b["device_id"], b["start"], b["volume"]) for b in got]


def test_flow_within_the_keys_cities_and_for_one_detector(world):
    assert {b["device_id"] for b in world.items("/traffic/flow", world.nanchang, **WINDOW)} == {NC_DET}
    assert {r["device_id"] for r in world.csv("/traffic/flow.csv", world.nanchang, **WINDOW)} == {NC_DET}
    assert {b["device_id"] for b in world.items("/traffic/flow", world.two_cities, **WINDOW)} == {NC_DET, YT_DET}
    assert {b["device_id"] for b in world.items("/traffic/flow", device=YT_DET, **WINDOW)} == {YT_DET}
    assert world.items("/traffic/flow", world.nanchang, device=YT_DET, **WINDOW) == []
    assert world.anonymous("/traffic/flow", **WINDOW) == 401 and world.anonymous("/traffic/flow.csv", **WINDOW) == 401


def test_flow_refuses_long_or_backward_windows(world):
    headers = {"Authorization": f"Bearer {world.viewer}"}
    for query in ({"from": UNTIL.isoformat(), "to": SINCE.isoformat()},
                  {"from": SINCE.isoformat(), "to": (SINCE + timedelta(days=2)).isoformat()},
                  {"from": "2026-09-14T08:00:00", "to": UNTIL.isoformat()},            # no offset
                  {**WINDOW, "interval": "10m"}, {**WINDOW, "per": "road"}):
        answer = world.client.get("/traffic/flow", params=query, headers=headers)
        assert answer.status_code == 422 and answer.headers["content-type"] == "application/problem+json", query
    # one detector: up to 31 days
    long = {"from": SINCE.isoformat(), "to": (SINCE + timedelta(days=20)).isoformat()}
    assert world.client.get("/traffic/flow", params={**long, "device": NC_DET}, headers=headers).status_code == 200
    answer = world.client.get("/traffic/flow", params={**WINDOW, "city": YINGTAN},
                              headers={"Authorization": f"Bearer {world.nanchang}"})
    assert answer.status_code == 403


def test_parking_hours_equal_the_sql_recount(world):
    since, until = _at(9, 0), _at(15, 0)
    window = {"from": since.isoformat(), "to": until.isoformat()}
    with psycopg.connect(world.db_url) as conn:
        recount = _sql_occupancy(conn, since, until)
        codes = dict(conn.execute("SELECT name, site_id FROM sites").fetchall())
    got = world.items("/traffic/parking", **window)
    lot = {datetime.fromisoformat(p["hour"]).hour: p for p in got if p["site_kind"] == "parking_lot"}
    scenic = {datetime.fromisoformat(p["hour"]).hour: p for p in got if p["site_kind"] == "scenic_spot"}
    assert sorted(lot) == list(range(9, 15)) and sorted(scenic) == [9, 10]
    for p in got:
        known, occupied = recount[(codes[p["site_name"]], datetime.fromisoformat(p["hour"]))]
        assert (p["known_s"], p["occupied_s"]) == pytest.approx((known, occupied))
        assert p["occupancy"] == pytest.approx(occupied / known)
    # the stays by hand (tests/analytics/test_traffic.py's sequence): park-a arrives 09:30 and 14:20
    assert {h: p["arrivals"] for h, p in lot.items()} == {9: 1, 10: 0, 11: 0, 12: 0, 13: 0, 14: 1}
    assert lot[9]["turnover"] == pytest.approx(1 / 3) and lot[14]["overstays"] == 1
    assert {p["city"] for p in lot.values()} == {NANCHANG} and {p["city"] for p in scenic.values()} == {YINGTAN}
    assert [p["hour"] for p in world.csv("/traffic/parking.csv", **window)] == [p["hour"] for p in got]
    # by kind, by key
    assert {p["site_kind"] for p in world.items("/traffic/parking", kind="scenic_spot", **window)} == {"scenic_spot"}
    assert {p["city"] for p in world.items("/traffic/parking", world.nanchang, **window)} == {NANCHANG}
    assert {r["city"] for r in world.csv("/traffic/parking.csv", world.nanchang, **window)} == {str(NANCHANG)}
    assert len(world.items("/traffic/parking", world.two_cities, **window)) == len(got)
    # another zone's local hours: the same sensor-seconds, on hours of that zone
    utc = world.items("/traffic/parking", tz="UTC", **window)
    assert sum(p["known_s"] for p in utc) == pytest.approx(sum(p["known_s"] for p in got))
    assert {datetime.fromisoformat(p["hour"]).utcoffset() for p in utc} == {timedelta(0)}
    assert world.anonymous("/traffic/parking", **window) == 401
    bad = world.client.get("/traffic/parking", params={**window, "tz": "Mars/Olympus"},
                           headers={"Authorization": f"Bearer {world.viewer}"})
    assert bad.status_code == 422
