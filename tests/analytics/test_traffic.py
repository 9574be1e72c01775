"""Traffic KPIs and parking figures, each against a plain-SQL recount over ``traffic_flow`` /
``parking_events`` stored through the real pipeline; local 5/15-minute bucket edges; dwell and turnover
from a hand-made parking sequence; LOS and grade at their band edges."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest

import decoders
from analytics.traffic import (
    FlowBucket,
    GRADE_SPEED_BANDS, LOS_DENSITY_VPKMPL, congestion_grade, flow_buckets, los_band, parking_hours, stays,
)
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink
from tests.helpers import store_uplinks

TZ = ZoneInfo("Asia/Shanghai")
DAY = datetime(2026, 9, 14, tzinfo=TZ)                 # a Monday, local midnight
DETECTORS = ("det-bayi-01", "det-bayi-02")


def _process(db_url: str, uplinks: list[Uplink]) -> dict[str, int]:
    return store_uplinks(db_url, uplinks)


def _store(db_url: str, uplinks: list[Uplink]) -> None:
    counters = _process(db_url, uplinks)
    assert counters["stored"] == len(uplinks), counters


def _lane(rng: random.Random, channel: int) -> dict:
    a, b, c = rng.randint(0, 2), rng.randint(0, 4), rng.randint(0, 30)
    if a + b + c == 0:
        return {"channel": channel, "count_a": 0, "count_b": 0, "count_c": 0, "occupancy_pct": 0.0,
                "speed_kmh": None}
    return {"channel": channel, "count_a": a, "count_b": b, "count_c": c,
            "occupancy_pct": round(rng.uniform(1, 60), 1), "speed_kmh": rng.randint(8, 70), "length_m": 4.5,
            "headway_s": 2.0, "gap_s": 1.5, "stops": 0.3, "stop_duration_s": 4.0}


@pytest.fixture
def flow(db_url):
    """Two detectors on Bayi Avenue (2 and 3 lanes), one frame a minute from 07:52:30 to 08:37:30 local,
    plus frames at 08:14:59 and 08:15:00 (either side of a 5- and 15-minute edge)."""
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [DeviceRecord(device_id=d, model="gbt43229-detector", city="Nanchang",
                                             site_kind="intersection", site_name="八一大道/中山路",
                                             installed_at=DAY - timedelta(days=1)) for d in DETECTORS])
    rng = random.Random(13)
    uplinks = []
    times = [DAY + timedelta(hours=7, minutes=52, seconds=30 + 60 * k) for k in range(46)]
    times += [DAY + timedelta(hours=8, minutes=14, seconds=59), DAY + timedelta(hours=8, minutes=15)]
    for k, device in enumerate(DETECTORS):
        for n, at in enumerate(times):
            lanes = [_lane(rng, c) for c in range(1, 3 + k)]
            frame = decoders.encode("gbt43229", {"division_code": 360100, "device_type": 2, "device_number": n,
                                                 "lanes": lanes})
            uplinks.append(Uplink(device_id=device, payload=frame, transport="mqtt", received_at=at.timestamp()))
    _store(db_url, uplinks)
    return db_url


def _sql_buckets(conn, width_min: int, per: str) -> dict:
    lane = "channel" if per == "lane" else "NULL::smallint"
    rows = conn.execute(f"""
        WITH f AS (
            SELECT device_id, {lane} AS lane, channel,
                   date_bin('{width_min} minutes', time AT TIME ZONE 'Asia/Shanghai', '2000-01-01')
                       AT TIME ZONE 'Asia/Shanghai' AS start,
                   coalesce(count_a, 0) AS a, coalesce(count_b, 0) AS b, coalesce(count_c, 0) AS c,
                   coalesce(count_a, 0) + coalesce(count_b, 0) + coalesce(count_c, 0)
                       + CASE WHEN num_nulls(count_a, count_b, count_c) = 3
                              THEN coalesce((extra->>'volume')::float8, 0) ELSE 0 END AS n,
                   occupancy_pct, speed_kmh
              FROM traffic_flow)
        SELECT device_id, lane, start, count(*), count(DISTINCT channel), sum(a), sum(b), sum(c), sum(n),
               avg(occupancy_pct),
               sum(n * speed_kmh) FILTER (WHERE n > 0 AND speed_kmh > 0)
                   / nullif(sum(n) FILTER (WHERE n > 0 AND speed_kmh > 0), 0),
               sum(n) FILTER (WHERE n > 0 AND speed_kmh > 0)
                   / nullif(sum(n / speed_kmh) FILTER (WHERE n > 0 AND speed_kmh > 0), 0)
          FROM f GROUP BY 1, 2, 3""").fetchall()
    return {(r[0], r[1], r[2]): r[3:] for r in rows}


@pytest.mark.parametrize("width_min", [5, 15])
@pytest.mark.parametrize("per", ["lane", "detector"])
def test_flow_buckets_equal_the_sql_recount(flow, width_min, per):
    since, until = DAY + timedelta(hours=7, minutes=45), DAY + timedelta(hours=8, minutes=45)
    with psycopg.connect(flow) as conn:
        got = flow_buckets(conn, since, until, width_s=width_min * 60, tz=TZ, per=per)
        expected = _sql_buckets(conn, width_min, per)
    assert len(got) == len(expected) > 0
    for b in got:
        frames, lanes, a, bb, c, n, occ, v_t, v_s = expected[(b.device_id, b.channel, b.start)]
        assert (b.frames, b.lanes, b.count_a, b.count_b, b.count_c, b.volume) == (frames, lanes, a, bb, c, n)
        assert b.occupancy_pct == pytest.approx(occ)
        assert b.time_mean_kmh == pytest.approx(v_t)
        assert b.space_mean_kmh == pytest.approx(v_s)
        assert b.flow_vph == pytest.approx(n * 60 / width_min)
        if n:
            assert b.density_vpkm == pytest.approx(b.flow_vph / v_s)
            assert b.density_vpkmpl == pytest.approx(b.flow_vph / v_s / lanes)
            assert b.los == los_band(b.density_vpkmpl) and b.grade == congestion_grade(v_s, "arterial")
        assert b.start.tzinfo == TZ and (b.start.minute % width_min, b.start.second) == (0, 0)


def test_buckets_split_at_local_edges(flow):
    """Frames at 08:14:59 and 08:15:00 local land in the buckets starting 08:10 / 08:00 and 08:15."""
    with psycopg.connect(flow) as conn:
        for width, before in ((300, 10), (900, 0)):
            got = {(b.device_id, b.channel, b.start.hour, b.start.minute): b.frames
                   for b in flow_buckets(conn, DAY + timedelta(hours=8, minutes=14, seconds=59),
                                         DAY + timedelta(hours=8, minutes=15, seconds=1), width_s=width, tz=TZ)}
            assert got == {(d, c, 8, m): 1 for d in DETECTORS for c in (1, 2) for m in (before, 15)} | \
                {(DETECTORS[1], 3, 8, m): 1 for m in (before, 15)}


def test_a_json_counter_that_gives_only_its_total(flow):
    """A Cat-1 JSON counter reporting a lane's total without classes: its vehicles count, unclassified."""
    import json

    with psycopg.connect(flow) as conn:
        register_devices(conn, [DeviceRecord(device_id="json-counter-1", model="cat1-json-traffic-counter",
                                             city="Nanchang", site_kind="intersection", site_name="八一大道/中山路",
                                             installed_at=DAY - timedelta(days=1))])
    at = [DAY + timedelta(hours=8, minutes=m) for m in (1, 2, 3)]
    _store(flow, [Uplink(device_id="json-counter-1", transport="mqtt", received_at=t.timestamp(),
                         payload=json.dumps({"ts": int(t.timestamp()), "lane": 1, "flow": {"total": v},
                                             "speed": s, "occupancy": 10.0}).encode())
                  for t, v, s in zip(at, (10, 20, 30), (30, 40, 60))])
    with psycopg.connect(flow) as conn:
        got = flow_buckets(conn, DAY + timedelta(hours=8), DAY + timedelta(hours=8, minutes=5), width_s=300, tz=TZ,
                           device_ids=["json-counter-1"])
        expected = _sql_buckets(conn, 5, "lane")
    assert len(got) == 1
    b = got[0]
    assert (b.count_a, b.count_b, b.count_c, b.unclassified, b.volume) == (0, 0, 0, 60, 60)
    assert b.space_mean_kmh == pytest.approx(60 / (10 / 30 + 20 / 40 + 30 / 60))
    assert b.space_mean_kmh == pytest.approx(expected[("json-counter-1", 1, b.start)][8])


def test_a_city_filter_and_bad_arguments(flow):
    since, until = DAY, DAY + timedelta(days=1)
    with psycopg.connect(flow) as conn:
        assert flow_buckets(conn, since, until, city="Yingtan") == []
        assert len(flow_buckets(conn, since, until, city="南昌")) == len(flow_buckets(conn, since, until))
        with pytest.raises(ValueError, match="width_s"):
            flow_buckets(conn, since, until, width_s=600)
        with pytest.raises(ValueError, match="per must be"):
            flow_buckets(conn, since, until, per="road")


def test_los_at_its_band_edges():
    assert LOS_DENSITY_VPKMPL[0] == pytest.approx(11 / 1.609344)
    for band, edge in zip("ABCDE", LOS_DENSITY_VPKMPL):
        assert los_band(edge) == band                        # the edge belongs to the better band
        assert los_band(edge + 1e-9) == chr(ord(band) + 1)
    assert los_band(0.0) == "A" and los_band(None) is None


def test_grade_at_its_band_edges():
    # GB/T 33171-2016 arterial: v > 40 smooth, 30 < v <= 40, 20 < v <= 30, 15 < v <= 20, v <= 15.
    expected = {40.0001: "smooth", 40.0: "basically_smooth", 30.0: "light", 20.0: "moderate", 15.0: "severe",
                0.5: "severe", 80.0: "smooth"}
    for v, grade in expected.items():
        assert congestion_grade(v, "arterial") == grade
    for road_class, edges in GRADE_SPEED_BANDS.items():
        assert [congestion_grade(e, road_class) for e in edges] == ["basically_smooth", "light", "moderate", "severe"]
    assert congestion_grade(None) is None
    with pytest.raises(ValueError, match="unknown road class"):
        congestion_grade(30.0, "motorway")
    with pytest.raises(ValueError, match="falling"):
        congestion_grade(30.0, "x", {"x": (10.0, 20.0, 30.0, 40.0)})


# --------------------------------------------------------------------------- parking

def _at(hh: int, mm: int) -> datetime:
    return DAY + timedelta(hours=hh, minutes=mm)


# (sensor, local time, occupied, info frame (a change) or keep-alive)
SEQUENCE = [
    ("park-a", _at(8, 40), False, False),
    ("park-a", _at(9, 30), True, True),                  # arrival
    *[("park-a", _at(h, 30), True, False) for h in (10, 11, 12, 13)],
    ("park-a", _at(14, 0), False, True),                 # departure after 4.5 h: an overstay
    ("park-a", _at(14, 20), True, True),                 # arrival
    ("park-a", _at(14, 50), False, True),                # departure after 30 min
    *[("park-b", _at(h, 50), False, False) for h in range(8, 15)],
    ("park-s", _at(9, 0), True, False),                  # then silent: known for 2 h only
]


@pytest.fixture
def parking(db_url):
    lot = dict(city="Nanchang", site_kind="parking_lot", site_name="万寿宫停车场", installed_at=DAY - timedelta(days=1))
    scenic = dict(city="Nanchang", site_kind="scenic_spot", site_name="滕王阁", installed_at=DAY - timedelta(days=1))
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [DeviceRecord(device_id=d, model="nb-parking-sensor", **lot)
                                for d in ("park-a", "park-b", "park-c")]
                         + [DeviceRecord(device_id="park-s", model="nb-parking-sensor", **scenic)])
    uplinks = [Uplink(device_id=d, payload=decoders.encode("parking", {
                   "frame_type": 0 if info else 1, "occupied": occupied, "frame_counter": k, "battery_mv": 3500,
                   "node_hour": at.hour, "node_minute": at.minute}), transport="coap", received_at=at.timestamp())
               for k, (d, at, occupied, info) in enumerate(SEQUENCE)]
    _store(db_url, uplinks)
    return db_url


def _sql_occupancy(conn, since: datetime, until: datetime) -> dict:
    """Known and occupied sensor-seconds per site and hour: each report's state held until the next
    report, at most 2 × 3600 s, clipped to the range, overlapped with each hour by plain SQL."""
    return {(r[0], r[1]): (float(r[2]), float(r[3])) for r in conn.execute("""
        WITH ev AS (
            SELECT device_id, time, occupied, lead(time) OVER (PARTITION BY device_id ORDER BY time) AS nxt
              FROM parking_events WHERE occupied IS NOT NULL),
        iv AS (
            SELECT d.site_id, greatest(ev.time, %(since)s) AS a,
                   least(coalesce(ev.nxt, %(until)s), ev.time + interval '7200 s', %(until)s) AS b, ev.occupied
              FROM ev JOIN devices d USING (device_id)),
        h AS (SELECT generate_series(%(since)s, %(until)s - interval '1 hour', interval '1 hour') AS h)
        SELECT iv.site_id, h.h,
               sum(greatest(0, extract(epoch FROM least(iv.b, h.h + interval '1 hour') - greatest(iv.a, h.h)))),
               coalesce(sum(greatest(0, extract(epoch FROM least(iv.b, h.h + interval '1 hour')
                                                          - greatest(iv.a, h.h)))) FILTER (WHERE iv.occupied), 0)
          FROM iv CROSS JOIN h GROUP BY 1, 2""", {"since": since, "until": until})}


def test_parking_hours_from_a_hand_made_sequence(parking):
    since, until = _at(9, 0), _at(15, 0)
    with psycopg.connect(parking) as conn:
        got = parking_hours(conn, since, until, tz=TZ)
        recount = _sql_occupancy(conn, since, until)
    lot = {p.hour.hour: p for p in got if p.site_kind == "parking_lot"}
    scenic = {p.hour.hour: p for p in got if p.site_kind == "scenic_spot"}
    assert sorted(lot) == list(range(9, 15)) and sorted(scenic) == [9, 10]
    assert {p.spaces for p in lot.values()} == {3} and {p.spaces for p in scenic.values()} == {1}
    # By hand: park-a occupied 09:30-14:00 and 14:20-14:50, park-b free throughout, park-c never heard.
    occupied = {9: 1800, 10: 3600, 11: 3600, 12: 3600, 13: 3600, 14: 1800}
    for h, p in lot.items():
        assert (p.known_s, p.occupied_s) == (7200, occupied[h])
        assert p.occupancy == pytest.approx(occupied[h] / 7200)
        assert (p.known_s, p.occupied_s) == pytest.approx(recount[(p.site_id, p.hour)])
    assert {h: p.arrivals for h, p in lot.items()} == {9: 1, 10: 0, 11: 0, 12: 0, 13: 0, 14: 1}
    assert lot[9].turnover == pytest.approx(1 / 3) and lot[10].turnover == 0
    assert (lot[14].stays_ended, lot[14].mean_dwell_s, lot[14].overstays) == (2, (4.5 * 3600 + 1800) / 2, 1)
    assert all(p.stays_ended == 0 and p.mean_dwell_s is None for h, p in lot.items() if h != 14)
    # The silent scenic sensor's state is held for 2 × its 1-hour interval, then unknown.
    assert [(scenic[h].known_s, scenic[h].occupancy) for h in (9, 10)] == [(3600, 1.0), (3600, 1.0)]
    assert (scenic[9].known_s, scenic[9].occupied_s) == pytest.approx(recount[(scenic[9].site_id, scenic[9].hour)])


def test_a_state_before_the_range_is_carried_in(parking):
    """From 10:00, park-a's 09:30 arrival lies before the range: it is occupied from 10:00 without an
    arrival, and its stay still ends (counted) at 14:00."""
    with psycopg.connect(parking) as conn:
        got = {p.hour.hour: p for p in parking_hours(conn, _at(10, 0), _at(15, 0), tz=TZ)
               if p.site_kind == "parking_lot"}
    assert got[10].occupied_s == 3600 and got[10].arrivals == 0
    assert got[14].stays_ended == 2 and got[14].overstays == 1


def test_open_overstays(parking):
    """park-a, taken at 09:30, is an open overstay from 13:30 until its departure at 14:00; park-s, taken
    (no arrival seen) and silent since 09:00, is none."""
    from analytics.traffic import open_overstays

    with psycopg.connect(parking) as conn:
        assert open_overstays(conn, _at(13, 30), tz=TZ) == []
        [o] = open_overstays(conn, _at(13, 45), tz=TZ)
        assert (o.device_id, o.site_name, o.arrived, o.parked_s) == ("park-a", "万寿宫停车场", _at(9, 30), 4.25 * 3600)
        assert open_overstays(conn, _at(14, 1), tz=TZ) == []
        assert open_overstays(conn, _at(13, 45), tz=TZ, city="Yingtan") == []


def test_stays_need_a_seen_arrival():
    events = [(0.0, True), (10.0, False), (20.0, True), (30.0, True), (50.0, False), (60.0, True)]
    assert [(s.arrived, s.departed) for s in stays(events)] == [(20.0, 50.0)]
    assert stays([]) == [] and stays([(0.0, False), (1.0, True)]) == []


def test_parking_refuses_a_backward_range(parking):
    with psycopg.connect(parking) as conn, pytest.raises(ValueError, match="since < until"):
        parking_hours(conn, _at(10, 0), _at(9, 0))


# --------------------------------------------------------------------------- a simulated corridor

def test_a_simulated_corridor_equals_the_recount(db_url):
    from simulators.engine import Simulation
    from simulators.scenario import load_scenario

    base = load_scenario("nanchang-traffic")
    fleets = tuple(replace(f, count=max(1, f.count // 40), behaviour=replace(f.behaviour, corrupt=0.0))
                   for f in base.fleets)
    scenario = replace(base, fleets=fleets, duration_s=3 * 3600)
    sim = Simulation(scenario)
    with psycopg.connect(db_url) as conn:
        register_devices(conn, sim.device_records)
    records = list(sim.records())
    _process(db_url, [Uplink(device_id=r.device_id, payload=r.payload, transport=r.transport, received_at=r.t)
                      for r in records])
    start = datetime.fromtimestamp(scenario.start, TZ)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM traffic_flow").fetchone()[0] > 0
        got = flow_buckets(conn, start, start + timedelta(days=1), width_s=900, tz=TZ, per="lane")
        expected = _sql_buckets(conn, 15, "lane")
        assert len(got) == len(expected)
        for b in got:
            row = expected[(b.device_id, b.channel, b.start)]
            assert b.volume == row[5] and b.space_mean_kmh == pytest.approx(row[8])
        hours = parking_hours(conn, start, start + timedelta(hours=3), tz=TZ)
        recount = _sql_occupancy(conn, start, start + timedelta(hours=3))
    assert hours
    # The simulator registers its sensors now, after the simulated day: those reporting count as spaces.
    registered = {}
    for record in sim.device_records:
        if record.model == "nb-parking-sensor":
            registered[record.site_name] = registered.get(record.site_name, 0) + 1
    assert {p.site_name: p.spaces for p in hours} == registered
    for p in hours:
        assert (p.known_s, p.occupied_s) == pytest.approx(recount[(p.site_id, p.hour)])


def test_report_traffic_prints_tables_and_csv(flow, parking, monkeypatch):
    from typer.testing import CliRunner

    from iotjx.cli import app
    from iotjx.settings import get_settings

    monkeypatch.setenv("IOTJX_DATABASE_URL", flow)
    get_settings.cache_clear()
    hours = str(int((datetime.now(TZ) - DAY).total_seconds() // 3600) + 1)
    try:
        runner = CliRunner()
        shown = runner.invoke(app, ["report", "traffic", "--city", "Nanchang", "--hours", hours],
                              env={"COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        for title in ("Lanes, 15-minute buckets", "Detectors (all lanes", "Parking per site and local hour",
                      "Scenic spots with live smart parking"):
            assert title in shown.output
        lanes = runner.invoke(app, ["report", "traffic", "--csv", "--section", "lanes", "--hours", hours])
        assert lanes.exit_code == 0, lanes.output
        rows = lanes.output.strip().splitlines()
        assert rows[0].startswith("device_id,lane,start,frames") and len(rows) - 1 == 5 * 4   # 5 lanes × 4 quarters
        parking_rows = runner.invoke(app, ["report", "traffic", "--csv", "--section", "parking", "--hours",
                                           hours]).output.strip().splitlines()
        assert parking_rows[0].startswith("city_code,site_id,site,kind,hour") and any(
            ",万寿宫停车场,parking_lot," in r and ",1,0.333,2," in r for r in parking_rows)
        every = runner.invoke(app, ["report", "traffic", "--csv", "--hours", hours]).output
        assert [line for line in every.splitlines() if line.startswith("# ")] == \
            ["# lanes", "# detectors", "# parking", "# overstays", "# scenic"]
        bad = runner.invoke(app, ["report", "traffic", "--city", "Atlantis"])
        assert bad.exit_code == 2 and "unknown city" in bad.output
        assert runner.invoke(app, ["report", "traffic", "--section", "roads"]).exit_code == 2
    finally:
        get_settings.cache_clear()


# --------------------------------------------------------------------------- the grouping against a plain reference

def _reference(rows, width_min: int, per: str) -> dict:
    """Plain Python: dicts keyed by (device, lane, local bucket start), sums in loops."""
    out: dict = {}
    for device, channel, t, a, b, c, x, occ, v in rows:
        local = datetime.fromtimestamp(t, TZ)
        start = local.replace(minute=local.minute - local.minute % width_min, second=0, microsecond=0)
        key = (device, channel if per == "lane" else None, start)
        g = out.setdefault(key, {"frames": 0, "lanes": set(), "abcx": [0, 0, 0, 0], "occ": [], "n": 0.0, "nv": 0.0,
                                 "n_v": 0.0})
        g["frames"] += 1
        g["lanes"].add(channel)
        for k, value in enumerate((a, b, c, x)):
            g["abcx"][k] += value
        if occ is not None:
            g["occ"].append(occ)
        n = a + b + c + x
        if n > 0 and v is not None and v > 0:
            g["n"] += n
            g["nv"] += n * v
            g["n_v"] += n / v
    return out


def test_the_grouping_equals_a_plain_reference():
    import numpy as np
    from hypothesis import given, settings, strategies as st

    from analytics.traffic import _flow_buckets

    row = st.tuples(st.sampled_from(["d1", "d2", "d3"]), st.integers(1, 4),
                    st.integers(int(DAY.timestamp()), int(DAY.timestamp()) + 7200).map(float),
                    st.integers(0, 5), st.integers(0, 5), st.integers(0, 40), st.integers(0, 3),
                    st.one_of(st.none(), st.floats(0, 100)), st.one_of(st.none(), st.floats(0, 150)))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(row, min_size=1, max_size=60), st.sampled_from([5, 15]), st.sampled_from(["lane", "detector"]))
    def check(rows, width_min, per):
        got = _flow_buckets(np.array([r[0] for r in rows], dtype=object), np.array([r[1] for r in rows]),
                            np.array([r[2] for r in rows]), np.array([r[3:7] for r in rows], dtype=np.int64),
                            np.array([np.nan if r[7] is None else r[7] for r in rows]),
                            np.array([np.nan if r[8] is None else r[8] for r in rows]),
                            width_min * 60, TZ, per, lambda _d: "arterial")
        expected = _reference(rows, width_min, per)
        assert len(got) == len(expected)
        for b in got:
            g = expected[(b.device_id, b.channel, b.start)]
            assert (b.frames, b.lanes) == (g["frames"], len(g["lanes"]))
            assert [b.count_a, b.count_b, b.count_c, b.unclassified] == g["abcx"] and b.volume == sum(g["abcx"])
            assert b.occupancy_pct == (pytest.approx(sum(g["occ"]) / len(g["occ"])) if g["occ"] else None)
            assert b.time_mean_kmh == (pytest.approx(g["nv"] / g["n"]) if g["n"] else None)
            assert b.space_mean_kmh == (pytest.approx(g["n"] / g["n_v"]) if g["n"] else None)

    check()


@pytest.mark.parametrize("width_min", [5, 15])
@pytest.mark.parametrize("per", ["lane", "detector"])
def test_the_figures_from_the_writers_rollup_equal_those_from_the_readings(flow, width_min, per):
    """The lane × 5-minute rollup kept by the writer gives every figure `flow_buckets` computes from the
    readings (the 15-minute buckets made of three 5-minute ones), JSON counters' unclassified totals included."""
    from analytics.traffic import flow_buckets_from_rollups

    with psycopg.connect(flow) as conn:
        register_devices(conn, [DeviceRecord(device_id="cnt-json-01", model="cat1-json-traffic-counter", city="Nanchang",
                                             site_kind="intersection", site_name="八一大道/中山路",
                                             installed_at=DAY - timedelta(days=1))])
    at = DAY + timedelta(hours=8, minutes=3)
    _store(flow, [Uplink("cnt-json-01", json.dumps({"lane": 1, "flow": {"total": v}, "speed": 30}).encode(), "mqtt",
                         (at + timedelta(seconds=40 * k)).timestamp()) for k, v in enumerate((2.5, 3.5, 7))])
    since, until = DAY + timedelta(hours=7, minutes=45), DAY + timedelta(hours=8, minutes=45)
    with psycopg.connect(flow) as conn:
        want = flow_buckets(conn, since, until, width_s=width_min * 60, tz=TZ, per=per)
        got = flow_buckets_from_rollups(conn, since, until, width_s=width_min * 60, tz=TZ, per=per)
        assert flow_buckets_from_rollups(conn, since, until, city="Yingtan") == []
    assert len(got) == len(want) > 0 and any(b.unclassified for b in want)
    for g, w in zip(got, want, strict=True):
        for name in FlowBucket.__slots__:
            a, b = getattr(g, name), getattr(w, name)
            assert a == (pytest.approx(b, rel=1e-9) if isinstance(b, float) else b), (name, w)
