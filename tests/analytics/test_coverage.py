"""Every figure of /coverage, now and as of a past day, equals an independent SQL computation over the
readings tables (not the device_state summary nor the raw log the report reads), the registry, the
status history and the site catalogue — on the province-mix scenario extended with silent, retired and
inactive devices, closed sites, aliases, and devices of the wrong family at plan sites."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink
from iotjx.settings import Settings
from iotjx.sites import SiteRecord, import_sites
from iotjx.targets import A_GRADES, load_catalogue
from simulators.engine import Simulation
from simulators.scenario import load_scenario
from tests.conftest import fresh_database
from tests.helpers import bearer, insert_key

LIVE_FACTOR = 1.5
READINGS = ("water_readings", "fire_events", "traffic_flow", "parking_events")

CATALOGUE = [
    # The province-mix scenario names these spots in free text ("龙虎山", "庐山", …): aliases resolve them.
    SiteRecord("JX-SS-0001", "Yingtan", "scenic_spot", "龙虎山风景名胜区", ("龙虎山",), grade="5A"),
    SiteRecord("JX-SS-0002", "Jiujiang", "scenic_spot", "庐山风景名胜区", ("庐山", "Lushan"), grade="5A"),
    SiteRecord("JX-SS-0003", "Shangrao", "scenic_spot", "三清山风景名胜区", ("三清山",), grade="5A"),
    SiteRecord("JX-SS-0004", "Shangrao", "scenic_spot", "婺源江湾景区", ("婺源",), grade="5A"),
    SiteRecord("JX-SS-0005", "Ji'an", "scenic_spot", "井冈山风景旅游区", ("井冈山",), grade="5A"),
    SiteRecord("JX-SS-0101", "Nanchang", "scenic_spot", "梅岭", grade="4A"),                 # no devices: uncovered
    SiteRecord("JX-SS-0102", "Nanchang", "scenic_spot", "八一起义纪念馆景区", grade="4A"),   # a lane detector only
    SiteRecord("JX-SS-0103", "Ganzhou", "scenic_spot", "通天岩", grade="4A",               # closed: out of it
               status="closed", closed_on=date(2026, 1, 31)),
    SiteRecord("JX-SS-0201", "Xinyu", "scenic_spot", "一个3A景区", grade="3A"),             # below the grade
    SiteRecord("JX-SS-0102X", "Nanchang", "scenic_spot", "滕王阁", ("滕王阁景区",), grade="5A"),   # all retired
    SiteRecord("JX-MU-0001", "Nanchang", "museum", "江西省博物馆"),
    SiteRecord("JX-CO-0001", "Jingdezhen", "community", "Jingdezhen community 1", model_site=True,
               model_site_since=date(2025, 6, 1)),
    SiteRecord("JX-CO-0002", "Pingxiang", "community", "Pingxiang community 1", model_site=True,
               model_site_since=date(2099, 1, 1)),                                            # not yet a model
    SiteRecord("JX-CO-0003", "Xinyu", "community", "Xinyu community 1"),                        # not a model site
    SiteRecord("JX-CA-0001", "Nanchang", "campus", "南昌大学前湖校区"),
    SiteRecord("JX-CA-0002", "Yingtan", "campus", "鹰潭职业技术学院"),                          # a parking sensor only
    SiteRecord("JX-FA-0001", "Ji'an", "farm", "吉安井冈蜜柚示范区"),
    SiteRecord("JX-FA-0002", "Yichun", "farm", "宜春富硒农业园"),                              # a parking sensor only
    SiteRecord("JX-DZ-0001", "Yingtan", "dev_zone", "鹰潭高新区", model_site=True),
]


def _extra_devices(installed: datetime) -> list[tuple[DeviceRecord, str]]:
    """Devices beside the scenario's, each with what it will do: (record, 'live' / 'silent')."""
    out = []
    n = iter(range(10**6))

    def dev(model, site_id=None, **free):
        return DeviceRecord(device_id=f"86000000{next(n):07d}", model=model, site_id=site_id, installed_at=installed,
                            **free)

    out.append((replace(dev("gbt43229-detector", "JX-SS-0102"), reporting_interval_s=3600), "live"))   # a lane detector at a 4A spot
    out.append((dev("nb-parking-sensor", "JX-SS-0103"), "live"))          # at a closed spot
    out.append((dev("nb-parking-sensor", "JX-SS-0201"), "live"))          # at a 3A spot
    for _ in range(3):
        out.append((dev("nb-parking-sensor", "JX-SS-0102X"), "retire"))   # every device of this spot retired
    out.append((dev("nb-parking-sensor", "JX-MU-0001"), "live"))
    out.append((dev("nb-parking-sensor", "JX-MU-0001"), "silent"))
    # the alias and the official name of one spot: one site
    out.append((dev("nb-parking-sensor", city="Nanchang", site_kind="scenic_spot", site_name="滕王阁景区"), "retire"))
    out.append((dev("cjt188-nb-water-std", "JX-CA-0001"), "live"))
    out.append((dev("cjt188-nb-water-std", "JX-CA-0001"), "live"))
    out.append((dev("cjt188-nb-water-std", "JX-CA-0001"), "silent"))
    out.append((dev("gb26875-nb-smoke", "JX-CA-0001"), "live"))
    out.append((dev("nb-parking-sensor", "JX-CA-0002"), "live"))          # campus with a parking sensor only
    out.append((dev("cjt188-nb-water-std", "JX-FA-0001"), "live"))
    out.append((dev("nb-parking-sensor", "JX-FA-0002"), "live"))          # a farm with a parking sensor only
    out.append((dev("gb26875-nb-smoke", "JX-DZ-0001"), "inactive"))       # the dev zone's only device is inactive
    # a scenic spot nobody catalogued: unverified, never counted toward the plan
    out.append((dev("nb-parking-sensor", city="Ganzhou", site_kind="scenic_spot", site_name="某未登记景点"), "live"))
    return out


def _frame(model: str, k: int) -> bytes:
    import decoders
    if model.startswith("cjt188"):
        return decoders.encode("cjt188", {"meter_address": f"{k:014d}", "flow_m3": k / 100,
                                          "meter_time": datetime(2026, 11, 1, tzinfo=UTC)})
    if model == "nb-parking-sensor":
        return decoders.encode("parking", {"frame_type": 0, "occupied": True, "frame_counter": k % 256,
                                           "temperature_c": 20, "battery_mv": 3300, "mag_x": 1, "mag_y": 2, "mag_z": 3})
    if model == "gb26875-nb-smoke":
        from decoders.gb26875_encode import heartbeat
        return decoders.encode("gb26875", heartbeat(1001, datetime.now(UTC), serial=k % 65536))
    if model == "gbt43229-detector":
        import random

        from decoders.gbt43229 import random_lane
        return decoders.encode("gbt43229", {"division_code": 360100, "device_type": 2, "device_number": k,
                                            "lanes": [random_lane(random.Random(k), 1)]},
                               {"byte_order": "little", "crc": "modbus"})
    raise AssertionError(model)


@pytest.fixture(scope="module")
def province(pg_admin_url, template_db):
    """The province-mix scenario (4 %), its last day ending ten minutes ago, with the catalogue and the
    extra devices; some devices silent, some retired or made inactive — part of them before the end of
    yesterday (their history backdated), part now."""
    gen = fresh_database(pg_admin_url, template_db)
    url = next(gen)
    now = time.time()
    installed = datetime.fromtimestamp(now - 5 * 86400, UTC)
    scenario = replace(load_scenario("province-mix").scaled(0.04), start=now - 86400 - 600, duration_s=86400)
    sim = Simulation(scenario)
    records = [replace(r, installed_at=installed) for r in sim.device_records]
    extra = _extra_devices(installed)
    silent = {r.device_id for i, r in enumerate(records) if i % 23 == 0} | {r.device_id for r, what in extra
                                                                              if what == "silent"}
    with psycopg.connect(url) as conn:
        import_sites(conn, CATALOGUE)
        register_devices(conn, records + [r for r, _ in extra])
    uplinks = [Uplink(device_id=r.device_id, payload=r.payload, transport=r.transport, received_at=r.t)
               for r in sim.records() if r.t <= now and r.device_id not in silent]
    # The extra devices: an uplink now and one a day ago (so they were live at yesterday's end as well).
    for k, (r, what) in enumerate(extra):
        if what != "silent":
            frame = _frame(r.model, k)
            uplinks += [Uplink(device_id=r.device_id, payload=frame, transport="coap", received_at=now - 30),
                        Uplink(device_id=r.device_id, payload=_frame(r.model, k + 1000), transport="coap",
                               received_at=now - 86400 + 3600)]
    pipeline = Pipeline(DeviceRegistry(lambda: connect(url)), Writer(lambda: connect(url)))
    for i in range(0, len(uplinks), 5000):
        pipeline.process(uplinks[i:i + 5000])
    assert pipeline.counters["stored"] > 3000
    changed_before = [r.device_id for i, r in enumerate(records) if i % 31 == 5]
    changed_now = [r.device_id for i, r in enumerate(records) if i % 37 == 7]
    with psycopg.connect(url) as conn:
        retire = [r.device_id for r, what in extra if what == "retire"]
        conn.execute("UPDATE devices SET status = 'retired' WHERE device_id = ANY(%s)", (retire + changed_before[::2],))
        conn.execute("UPDATE devices SET status = 'inactive' WHERE device_id = ANY(%s)",
                     ([r.device_id for r, what in extra if what == "inactive"] + changed_before[1::2],))
        # …those changes were made two days ago (their history says so)
        conn.execute("""UPDATE device_status_log SET since = since - interval '2 days'
                        WHERE since > now() - interval '1 minute' AND status <> 'active'""")
        conn.execute("UPDATE devices SET status = 'inactive' WHERE device_id = ANY(%s)", (changed_now[::2],))
        conn.execute("UPDATE devices SET status = 'retired' WHERE device_id = ANY(%s)", (changed_now[1::2],))
        conn.execute("INSERT INTO target_progress_log (target_id, value, as_of, note, actor) VALUES "
                     "('5g-base-stations', 31000, current_date - 40, 'q3', 'test'), "
                     "('5g-base-stations', 41000, current_date - 2, 'q4', 'test')")
    yield url
    next(gen, None)


@pytest.fixture(scope="module")
def settings_for(province):
    # Yesterday's snapshot as soon as yesterday is over (the default waits IOTJX_COVERAGE_SNAPSHOT_DELAY_S: in
    # the first hour after local midnight the API's own snapshot was of the day before yesterday)
    return Settings(database_url=province, coverage_refresh_s=0, live_factor=LIVE_FACTOR, coverage_snapshot_delay_s=0)


# --------------------------------------------------------------------------- the independent computation

def _state_sql(instant_is_now: bool) -> str:
    """Devices at instant T (of local day D): status then, live then — from the readings tables."""
    status = "d.status" if instant_is_now else """coalesce(
        (SELECT l.status FROM device_status_log l WHERE l.device_id = d.device_id AND l.since <= %(T)s
         ORDER BY l.since DESC LIMIT 1),
        (SELECT l.status FROM device_status_log l WHERE l.device_id = d.device_id ORDER BY l.since LIMIT 1))"""
    union = " UNION ALL ".join(f"SELECT device_id, time FROM {t} WHERE time <= %(T)s" for t in READINGS)
    return f"""
    WITH last AS (SELECT device_id, max(time) AS t FROM ({union}) r GROUP BY device_id),
    raw AS (
        SELECT d.device_id, d.model, coalesce(m.family, m.pilot) AS family, d.network, {status} AS status,
               s.site_id, s.code, s.city_code, s.kind, s.grade, s.model_site, s.model_site_since, s.opened_on,
               s.closed_on, last.t AS last_t,
               %(f)s * coalesce(d.reporting_interval_s, m.reporting_interval_s) AS window_s
        FROM devices d JOIN device_models m ON m.model = d.model LEFT JOIN sites s ON s.site_id = d.site_id
        LEFT JOIN last ON last.device_id = d.device_id
        WHERE d.installed_at <= %(T)s),
    dev AS (
        SELECT *, status = 'active' AND last_t >= %(T)s - window_s * interval '1 second' AS live
        FROM raw WHERE status <> 'retired')
    """


def _device_filter(t) -> tuple[str, dict]:
    where, params = ["(family = ANY(%(fams)s) OR model = ANY(%(models)s))"], {
        "fams": list(t.devices.families), "models": list(t.devices.models)}
    if t.devices.network:
        where.append("network = %(net)s")
        params["net"] = t.devices.network
    return " AND ".join(where), params


def _site_filter(t) -> str:
    alts = []
    for c in t.sites:
        cond = [f"s.kind = '{c.kind}'"]
        if c.min_grade:
            cond.append(f"array_position(ARRAY{list(A_GRADES)}, s.grade) >= {A_GRADES.index(c.min_grade) + 1}")
        if c.grades:
            cond.append(f"s.grade = ANY(ARRAY{list(c.grades)})")
        if c.model_site:
            cond.append("s.model_site AND (s.model_site_since IS NULL OR s.model_site_since <= %(D)s)")
        alts.append("(" + " AND ".join(cond) + ")")
    return "(" + " OR ".join(alts) + ")"


def expected(conn, t, T: datetime, D: date, *, now: bool) -> dict:
    base = {"T": T, "D": D, "f": LIVE_FACTOR, "city": t.city}
    city = " AND city_code = %(city)s" if t.city is not None else ""
    if t.measure == "operator":
        row = conn.execute("""SELECT value FROM target_progress_log WHERE target_id = %s AND as_of <= %s
                              ORDER BY as_of DESC, entered_at DESC LIMIT 1""", (t.target_id, D)).fetchone()
        return {"value": row[0] if row else None}
    devs, params = _device_filter(t)
    params.update(base)
    if t.measure == "live_devices":
        plan = " AND code IS NOT NULL" if t.source == "plan" else ""
        live, reg, act = conn.execute(_state_sql(now) + f"""
            SELECT count(*) FILTER (WHERE live), count(*), count(*) FILTER (WHERE status = 'active')
            FROM dev WHERE {devs}{city}{plan}""", params).fetchone()
        return {"value": float(live), "registered": reg, "active": act, "live": live}
    share = t.min_live_share
    sites, meeting = conn.execute(_state_sql(now) + f"""
        , per_site AS (
            SELECT s.site_id,
                   (SELECT count(*) FROM dev WHERE dev.site_id = s.site_id AND dev.live AND {devs}) AS live_n,
                   (SELECT count(*) FROM dev WHERE dev.site_id = s.site_id AND dev.status = 'active' AND {devs}) AS active_n
            FROM sites s
            WHERE s.code IS NOT NULL AND {_site_filter(t)}
              AND (s.opened_on IS NULL OR s.opened_on <= %(D)s) AND (s.closed_on IS NULL OR s.closed_on > %(D)s)
              {city.replace('city_code', 's.city_code')})
        SELECT count(*), count(*) FILTER (WHERE live_n >= %(min)s
                                          AND (%(share)s::float8 IS NULL OR (active_n > 0 AND live_n * 100 >= %(share)s * active_n)))
        FROM per_site""", {**params, "min": t.min_live, "share": share}).fetchone()
    value = float(meeting) if t.measure == "sites_meeting" else (100.0 * meeting / sites if sites else None)
    return {"value": value, "sites_in_scope": sites, "sites_meeting": meeting}


def expected_breakdown(conn, T: datetime, *, now: bool) -> dict:
    rows = conn.execute(_state_sql(now) + """
        SELECT coalesce(city_code, 0), CASE WHEN family IN ('traffic', 'parking') THEN 'traffic' ELSE family END,
               network, count(*), count(*) FILTER (WHERE status = 'active'), count(*) FILTER (WHERE live)
        FROM dev GROUP BY 1, 2, 3""", {"T": T, "f": LIVE_FACTOR}).fetchall()
    return {(c or None, p, n): (r, a, lv) for c, p, n, r, a, lv in rows}


def _check(conn, body: dict, T: datetime, D: date, *, now: bool) -> None:
    catalogue = {t.target_id: t for t in load_catalogue()}
    got = {t["target_id"]: t for t in body["targets"]}
    assert set(got) == set(catalogue)
    for tid, t in catalogue.items():
        want = expected(conn, t, T, D, now=now)
        for field, value in want.items():
            assert got[tid][field] == (pytest.approx(value) if isinstance(value, float) else value), (tid, field)
        if want["value"] is not None:
            assert got[tid]["percent"] == pytest.approx(round(100 * want["value"] / t.value, 2)), tid
    breakdown = {(r["city"], r["pilot"], r["network"]): (r["registered"], r["active"], r["live"])
                 for r in body["breakdown"]}
    assert breakdown == expected_breakdown(conn, T, now=now)


def _client(settings, role="admin", cities=None) -> TestClient:
    return TestClient(create_app(settings), headers=bearer(insert_key(settings.database_url, role, cities)))


def test_every_figure_now_equals_sql_over_readings_registry_and_catalogue(province, settings_for):
    with _client(settings_for) as client:
        body = client.get("/coverage").json()
    assert body["source"] == "live"
    T = datetime.fromisoformat(body["state_at"])
    with psycopg.connect(province) as conn:
        _check(conn, body, T, date.fromisoformat(body["day"]), now=True)
        got = {t["target_id"]: t for t in body["targets"]}
        parking = got["tourism-smart-parking"]
        # The denominator is the catalogue's open 4A+ spots and museums, devices or not (the closed spot,
        # the 3A spot and the unverified free-text spot are not in it).
        assert parking["sites_in_scope"] == 5 + 2 + 1 + 1
        # covered: the five 5A spots of the scenario (live parking sensors) and the museum — not the
        # 4A spot with only a lane detector, not the device-less one, not the one whose sensors were retired.
        assert parking["sites_meeting"] == 6 and parking["value"] == pytest.approx(100 * 6 / 9)
        # the device registered by the alias "滕王阁景区" joined the three registered by the spot's id: one site
        assert conn.execute("SELECT count(*) FROM devices d JOIN sites s USING (site_id) WHERE s.code = 'JX-SS-0102X'"
                            ).fetchone()[0] == 4
        # what the old definitions would have counted is there: a live lane detector at the 4A spot
        # (any traffic device covered a spot), a live parking sensor at the closed and at the 3A spot,
        # live devices at an uncatalogued spot (any registered site was a denominator)
        for code in ("JX-SS-0102", "JX-SS-0103", "JX-SS-0201"):
            assert conn.execute(_state_sql(True) + "SELECT count(*) FROM dev WHERE code = %(c)s AND live",
                                {"T": T, "f": LIVE_FACTOR, "c": code}).fetchone()[0] == 1, code
    # a model community counts only when flagged (and from its day); farms and campuses only with the
    # families that make them
    assert got["smart-community-models"]["sites_in_scope"] == 1
    assert got["agri-iot-zones"]["sites_in_scope"] == 2 and got["agri-iot-zones"]["value"] == 1
    # campus 1: 3 of its 4 water and fire devices live (75 % < 80 %); campus 2: a parking sensor only
    assert got["smart-campus"]["sites_in_scope"] == 2 and got["smart-campus"]["sites_meeting"] == 0
    assert got["digital-dev-zones"]["value"] == 0
    assert body["unverified"]["devices"] >= 1
    assert got["5g-base-stations"]["value"] == 41000


def test_as_of_yesterday_from_its_snapshot_equals_sql_at_the_end_of_that_day(province, settings_for):
    with _client(settings_for) as client:
        today = date.fromisoformat(client.get("/coverage").json()["day"])
        day = today - timedelta(days=1)
        # The API took yesterday's snapshot by itself when it started (the day is over: no delay here)…
        from tests.helpers import wait_until
        assert wait_until(lambda: client.get("/coverage/snapshots").json()["count"] == 1)
        assert client.get("/coverage/snapshots").json()["days"][0]["day"] == str(day)
        # …so asking for it again takes nothing; a retake replaces it; a day never taken is a 404.
        again = client.post("/coverage/snapshots", json={"day": str(day)})
        assert again.status_code == 200 and again.json()["taken"] is False
        assert client.post("/coverage/snapshots", json={"day": str(day), "retake": True}).json()["taken"] is True
        missing = client.get("/coverage", params={"as_of": str(day - timedelta(days=30))})
        assert missing.status_code == 404 and "iotjx coverage snapshot" in missing.json()["detail"]
        body = client.get("/coverage", params={"as_of": str(day)}).json()
        assert client.get("/coverage", params={"as_of": str(today)}).status_code == 422   # not over yet
    assert body["source"] == "snapshot" and body["day"] == str(day)
    T = datetime.fromisoformat(body["state_at"])
    assert T == datetime.combine(today, datetime.min.time(), tzinfo=settings_for.tz)
    with psycopg.connect(province) as conn:
        _check(conn, body, T, day, now=False)
        # the devices retired or made inactive today were still active at the end of yesterday
        active_then = conn.execute(_state_sql(False) + "SELECT count(*) FROM dev WHERE status = 'active'",
                                   {"T": T, "f": LIVE_FACTOR}).fetchone()[0]
        active_now = conn.execute("SELECT count(*) FROM devices WHERE status = 'active'").fetchone()[0]
        assert active_then > active_now


def test_unknown_query_parameters_are_refused(province, settings_for):
    with _client(settings_for) as client:
        r = client.get("/coverage", params={"asof": "2022-12-31"})
        assert r.status_code == 422 and "asof" in r.json()["detail"]
        assert client.get("/coverage", params={"as_of": "2022-13-01"}).status_code == 422
        assert client.get("/targets", params={"city": 360100}).status_code == 422


@pytest.mark.parametrize("body", [{"value": "NaN"}, {"value": float("inf")}, {"value": -1}, {"value": 1e300},
                                  {"value": 1, "as_of": "2999-01-01"}, {"value": 1, "as_of": "1999-12-31"},
                                  {"value": 1, "note": "a\u0000b"}])
def test_operator_figures_refuse_what_is_not_a_figure(province, settings_for, body):
    with _client(settings_for, "operator") as client:
        import json
        r = client.put("/targets/5g-benchmarks/progress", content=json.dumps(body).replace('"NaN"', "NaN"),
                       headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")


def test_operator_figures_keep_every_entry_with_who_when_and_note(province, settings_for):
    with _client(settings_for, "operator") as client:
        first = client.put("/targets/miot-firms/progress", json={"value": 60, "as_of": "2022-06-30", "note": "H1"})
        second = client.put("/targets/miot-firms/progress", json={"value": 104, "as_of": "2022-12-31", "note": "year"})
        assert first.status_code == second.status_code == 200
        entries = client.get("/targets/miot-firms/progress").json()
        assert [e["value"] for e in entries] == [104, 60] and {e["note"] for e in entries} == {"H1", "year"}
        assert all(e["actor"].startswith("key:") for e in entries)
        assert client.put("/targets/smart-campus/progress", json={"value": 1}).status_code == 409
        assert client.put("/targets/smart-campus/progress", json={"value": 1}).headers["content-type"].startswith(
            "application/problem+json")
        # a percent target cannot be entered above 100 — none of the operator targets is one: all counts
        body = client.get("/coverage").json()
        firms = {t["target_id"]: t for t in body["targets"]}["miot-firms"]
        assert firms["value"] == 104
        # met at the deadline (the entry for 2022-12-31 counts for that day)
        assert firms["met_at_deadline"] is True and firms["status"] == "met"
    with psycopg.connect(province) as conn:
        assert conn.execute("SELECT count(*) FROM audit_log WHERE target = 'miot-firms'").fetchone()[0] == 2
