"""The water figure routes (api/routes/water.py) over hourly CJ/T 188 meters stored through the real
pipeline and `update_water`: consumption per city and day, each site's nights (MNF and leakage), silent
and stopped meters, each recomputed here in plain SQL from the readings, with an unscoped viewer, a
Nanchang key, a Nanchang + Yingtan key and no key (JSON and CSV)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from analytics.water import update_water
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink
from iotjx.sites import SiteRecord, import_sites
from tests.analytics.test_water import _RECOUNT, _frame
from tests.api.conftest import NANCHANG, YINGTAN
from tests.api.figures_world import module_world
from tests.helpers import store_uplinks

SHANGHAI_OFFSET = timedelta(hours=8)
NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
TODAY = (NOW + SHANGHAI_OFFSET).date()
START = datetime.combine(TODAY - timedelta(days=9), datetime.min.time(), UTC) - SHANGHAI_OFFSET   # local midnight
YT_A, YT_B, YT_SILENT, NC_A, NC_STOP = (f"86910000000000{k}" for k in range(1, 6))
SITES = {YT_A: ("Yingtan", "龙岗小区"), YT_B: ("Yingtan", "龙岗小区"), YT_SILENT: ("Yingtan", "龙岗小区"),
         NC_A: ("Nanchang", "红谷滩小区"), NC_STOP: ("Nanchang", "红谷滩小区")}


def _hourly_cents(device: str, at: datetime) -> int:
    """What a meter uses in the hour ending at `at`, in 0.01 m³: more by day, a night flow that varies by
    night (so the leakage percentile has something to choose from); NC_STOP uses nothing."""
    if device == NC_STOP:
        return 0
    local = at + SHANGHAI_OFFSET
    k = 1 + list(SITES).index(device)
    return k * (1 + local.day % 3) if local.hour < 6 else 10 * k


def _fill(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        # Yingtan's site is in the catalogue with its district; Nanchang's stays unverified (no district).
        import_sites(conn, [SiteRecord("JX-WT-0001", "Yingtan", "residential", "龙岗小区", district="月湖区")])
        register_devices(conn, [DeviceRecord(device_id=d, model="cjt188-nb-water-std", network="nbiot", city=city,
                                             site_kind="residential", site_name=site,
                                             installed_at=START - timedelta(days=1))
                                for d, (city, site) in SITES.items()])
    uplinks = []
    for device in SITES:
        cents, at, k = 500, START, 0
        last = NOW - timedelta(days=3) if device == YT_SILENT else NOW - timedelta(hours=1)
        while at <= last:
            cents += _hourly_cents(device, at)
            uplinks.append(Uplink(device_id=device, payload=_frame(at, cents / 100, address=device[-14:], serial=k % 256),
                                  transport="mqtt", received_at=at.timestamp() + 5))
            at, k = at + timedelta(hours=1), k + 1
    assert store_uplinks(db_url, uplinks)["stored"] == len(uplinks)
    with psycopg.connect(db_url) as conn:
        update_water(conn)


@pytest.fixture(scope="module")
def world(pg_admin_url, template_db, broker):
    yield from module_world(pg_admin_url, template_db, broker, _fill)


# --------------------------------------------------------------------------- consumption

def _consumption_recount(world, cities: set[int] | None) -> dict:
    rows = world.sql(f"""
        WITH m AS ({_RECOUNT})
        SELECT m.day, s.city_code, count(*), sum(m.m3) FROM m JOIN devices d USING (device_id)
        JOIN sites s ON s.site_id = d.site_id GROUP BY 1, 2""")
    return {(str(day), city): (n, m3) for day, city, n, m3 in rows if cities is None or city in cities}


def test_consumption_per_city_and_day_equals_the_readings_recount(world):
    since, until = str(TODAY - timedelta(days=9)), str(TODAY + timedelta(days=1))
    for key, cities in ((None, None), (world.nanchang, {NANCHANG}), (world.two_cities, {NANCHANG, YINGTAN})):
        expected = _consumption_recount(world, cities)
        got = world.json("/water/consumption", key, **{"from": since, "to": until})
        assert {(r["day"], r["city"]): (r["meters"], pytest.approx(r["consumption_m3"], abs=1e-6)) for r in got} \
            == {k: (n, pytest.approx(m3, abs=1e-6)) for k, (n, m3) in expected.items()}
        assert [(r["day"], r["city"]) for r in got] == sorted((r["day"], r["city"]) for r in got)
        lines = world.csv("/water/consumption.csv", key, **{"from": since, "to": until})
        assert {(r["day"], int(r["city"])): (int(r["meters"]), float(r["consumption_m3"])) for r in lines} \
            == {(r["day"], r["city"]): (r["meters"], r["consumption_m3"]) for r in got}
    nanchang = world.json("/water/consumption", world.nanchang, **{"from": since, "to": until})
    assert {r["city_name_en"] for r in nanchang} == {"Nanchang"} and {r["city_name_zh"] for r in nanchang} == {"南昌"}
    one_day = world.json("/water/consumption", **{"from": str(TODAY - timedelta(days=2)), "to": str(TODAY - timedelta(days=1))})
    assert {r["day"] for r in one_day} == {str(TODAY - timedelta(days=2))}


def test_consumption_refuses_bad_windows_and_other_cities(world):
    for query in ({"from": "2026-01-08", "to": "2026-01-01"}, {"from": "2024-01-01", "to": "2026-01-01"},
                  {"from": "2026-01-01"}, {"from": "someday", "to": "2026-01-02"}):
        answer = world.client.get("/water/consumption", params=query, headers={"Authorization": f"Bearer {world.viewer}"})
        assert answer.status_code == 422 and answer.headers["content-type"] == "application/problem+json", query
    answer = world.client.get("/water/consumption.csv", params={"from": "2026-01-01", "to": "2026-01-02", "city": YINGTAN},
                              headers={"Authorization": f"Bearer {world.nanchang}"})
    assert answer.status_code == 403
    assert world.anonymous("/water/consumption", **{"from": "2026-01-01", "to": "2026-01-02"}) == 401
    assert world.anonymous("/water/consumption.csv", **{"from": "2026-01-01", "to": "2026-01-02"}) == 401


def test_consumption_per_district_equals_the_readings_recount_and_adds_up_to_the_cities(world):
    """Per day, city and district, in plain SQL from the readings (_RECOUNT): Yingtan's meters under 月湖区
    (360602, their catalogue site's district), Nanchang's under the unknown district (an unverified site)."""
    since, until = str(TODAY - timedelta(days=9)), str(TODAY + timedelta(days=1))
    rows = world.sql(f"""
        WITH m AS ({_RECOUNT})
        SELECT m.day, s.city_code, s.district_code, count(*), sum(m.m3) FROM m JOIN devices d USING (device_id)
        JOIN sites s ON s.site_id = d.site_id GROUP BY 1, 2, 3""")
    assert {(city, district) for _, city, district, _, _ in rows} == {(YINGTAN, 360602), (NANCHANG, None)}
    for key, cities in ((None, None), (world.nanchang, {NANCHANG}), (world.two_cities, {NANCHANG, YINGTAN})):
        expected = {(str(day), city, district): (n, m3) for day, city, district, n, m3 in rows
                    if cities is None or city in cities}
        got = world.json("/water/consumption/districts", key, **{"from": since, "to": until})
        assert {(r["day"], r["city"], r["district_code"]): (r["meters"], pytest.approx(r["consumption_m3"], abs=1e-6))
                for r in got} == expected
        assert [(r["day"], r["city"]) for r in got] == sorted((r["day"], r["city"]) for r in got)
        lines = world.csv("/water/consumption/districts.csv", key, **{"from": since, "to": until})
        assert [(r["day"], int(r["city"]), r["district_code"], float(r["consumption_m3"])) for r in lines] \
            == [(r["day"], r["city"], "" if r["district_code"] is None else str(r["district_code"]),
                 r["consumption_m3"]) for r in got]
        # a city's districts add up to its row of /water/consumption
        per_city = {(r["day"], r["city"]): r["consumption_m3"]
                    for r in world.json("/water/consumption", key, **{"from": since, "to": until})}
        sums: dict = {}
        for r in got:
            sums[(r["day"], r["city"])] = sums.get((r["day"], r["city"]), 0.0) + r["consumption_m3"]
        assert sums == pytest.approx(per_city)
    yingtan = world.json("/water/consumption/districts", city=YINGTAN, **{"from": since, "to": until})
    assert {(r["district_code"], r["district_name_zh"], r["district_name_en"]) for r in yingtan} \
        == {(360602, *world.sql("SELECT name_zh, name_en FROM districts WHERE code = 360602")[0])}
    nanchang = world.json("/water/consumption/districts", world.nanchang, **{"from": since, "to": until})
    assert {(r["district_code"], r["district_name_zh"]) for r in nanchang} == {(None, None)}
    answer = world.client.get("/water/consumption/districts.csv", params={"from": since, "to": until, "city": YINGTAN},
                              headers={"Authorization": f"Bearer {world.nanchang}"})
    assert answer.status_code == 403
    bad = world.client.get("/water/consumption/districts", params={"from": until, "to": since},
                           headers={"Authorization": f"Bearer {world.viewer}"})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert world.anonymous("/water/consumption/districts", **{"from": since, "to": until}) == 401


# --------------------------------------------------------------------------- nights

_NIGHTS = """
    WITH r AS (
        SELECT device_id, meter_time AT TIME ZONE 'Asia/Shanghai' AS lt, flow_m3 FROM water_readings),
    slot AS (                       -- a meter's flow in the hourly slots 02-03 and 03-04 local (hourly readings)
        SELECT a.device_id, a.lt::date AS day, extract(hour FROM a.lt) AS h, b.flow_m3 - a.flow_m3 AS f
        FROM r a JOIN r b ON b.device_id = a.device_id AND b.lt = a.lt + interval '1 hour'
        WHERE extract(hour FROM a.lt) IN (2, 3) AND extract(minute FROM a.lt) = 0),
    counted AS (SELECT device_id, day FROM slot GROUP BY 1, 2 HAVING count(*) = 2),
    site AS (
        SELECT d.site_id, s.day, s.h, sum(s.f) AS flow, count(*) AS meters
        FROM slot s JOIN counted USING (device_id, day) JOIN devices d USING (device_id) GROUP BY 1, 2, 3),
    night AS (SELECT site_id, day, min(flow) AS mnf, max(meters) AS meters FROM site GROUP BY 1, 2)
    SELECT n.site_id, n.day, n.mnf, n.meters,
           (SELECT percentile_cont(0.2) WITHIN GROUP (ORDER BY m.mnf) FROM night m
             WHERE m.site_id = n.site_id AND m.day BETWEEN n.day - 6 AND n.day),
           (SELECT count(*) FROM night m WHERE m.site_id = n.site_id AND m.day BETWEEN n.day - 6 AND n.day)
    FROM night n ORDER BY 1, 2"""


def _site_codes(world) -> dict[int, tuple[str, str, int]]:
    return {r[0]: r[1:] for r in world.sql("SELECT site_id, code, name, city_code FROM sites")}


def test_a_sites_nights_equal_the_readings_recount(world):
    recount = world.sql(_NIGHTS)
    sites = _site_codes(world)
    assert {sites[s][1] for s, *_ in recount} == {"龙岗小区", "红谷滩小区"} and len(recount) >= 16
    # A site is named by its code; a site made by free text at registration has none: give it one.
    with psycopg.connect(world.db_url) as conn:
        conn.execute("UPDATE sites SET code = 'JX-RS-' || lpad(site_id::text, 4, '0') WHERE code IS NULL")
    sites = _site_codes(world)
    window = {"from": str(TODAY - timedelta(days=10)), "to": str(TODAY + timedelta(days=1))}
    for site_id, (code, name, city) in sites.items():
        got = world.json(f"/water/sites/{code}/nights", **window)
        mine = [r for r in recount if r[0] == site_id]
        assert [(n["day"], n["meters"], n["nights"]) for n in got] == [(str(d), m, k) for _, d, _, m, _, k in mine]
        for n, (_, _, mnf, _, leak, _) in zip(got, mine, strict=True):
            assert n["mnf_m3h"] == pytest.approx(float(mnf)) and n["leakage_m3h"] == pytest.approx(float(leak))
            assert (n["site_id"], n["site_name"], n["city"]) == (code, name, city)
        lines = world.csv(f"/water/sites/{code}/nights.csv", **window)
        assert [(r["day"], float(r["mnf_m3h"])) for r in lines] == [(n["day"], n["mnf_m3h"]) for n in got]
        scoped = world.client.get(f"/water/sites/{code}/nights", params=window,
                                  headers={"Authorization": f"Bearer {world.nanchang}"})
        assert scoped.status_code == (200 if city == NANCHANG else 404)
        assert world.anonymous(f"/water/sites/{code}/nights", **window) == 401
    # the latest night per site, highest leakage first
    latest = {}
    for site_id, day, mnf, meters, leak, _ in recount:
        if day <= TODAY:
            latest[site_id] = (day, float(leak))
    ranking = sorted(latest, key=lambda s: -latest[s][1])
    got = world.json("/water/nights", day=str(TODAY))
    assert [(n["site_id"], n["day"], pytest.approx(n["leakage_m3h"])) for n in got] \
        == [(sites[s][0], str(latest[s][0]), latest[s][1]) for s in ranking]
    assert [n["city"] for n in world.json("/water/nights", world.nanchang, day=str(TODAY))] == [NANCHANG]
    assert len(world.json("/water/nights", world.two_cities, day=str(TODAY), limit=1)) == 1
    assert world.json("/water/nights", day=str(TODAY - timedelta(days=30))) == []


# --------------------------------------------------------------------------- silent and stopped

_SILENT = """
    SELECT d.device_id, s.city_code FROM devices d JOIN device_models m USING (model)
    LEFT JOIN device_state st USING (device_id) LEFT JOIN sites s ON s.site_id = d.site_id
    WHERE d.status = 'active' AND coalesce(m.family, m.pilot) = 'water'
      AND NOT coalesce(st.last_seen >= now() - 1.5 * coalesce(d.reporting_interval_s, m.reporting_interval_s)
                                                * interval '1 second', false)"""


def test_silent_meters_equal_a_plain_sql_recount(world):
    recount = dict(world.sql(_SILENT))
    assert set(recount) == {YT_SILENT}                      # the story: it stopped reporting 3 days ago
    got = world.items("/water/silent-meters")
    assert [m["device_id"] for m in got] == sorted(recount)
    last = world.sql("SELECT max(time) FROM water_readings WHERE device_id = %s", (YT_SILENT,))[0][0]
    assert datetime.fromisoformat(got[0]["last_seen"]) == last and got[0]["city"] == YINGTAN
    assert [r["device_id"] for r in world.csv("/water/silent-meters.csv")] == sorted(recount)
    assert world.items("/water/silent-meters", world.nanchang) == []
    assert world.csv("/water/silent-meters.csv", world.nanchang) == []
    assert [m["device_id"] for m in world.items("/water/silent-meters", world.two_cities)] == [YT_SILENT]
    assert world.anonymous("/water/silent-meters") == 401 and world.anonymous("/water/silent-meters.csv") == 401


def test_stopped_meters_are_the_meters_whose_register_stood_still(world):
    # Plain SQL over the readings: meters whose register did not rise over the last 7 days of readings.
    still = {d for d, in world.sql("""
        SELECT device_id FROM water_readings WHERE meter_time >= now() - interval '7 days'
        GROUP BY device_id HAVING max(flow_m3) = min(flow_m3) AND count(*) > 1""")}
    assert still == {NC_STOP}
    got = world.items("/water/stopped-meters")
    assert [m["device_id"] for m in got] == [NC_STOP] and got[0]["city"] == NANCHANG
    assert [m["device_id"] for m in world.items("/water/stopped-meters", world.nanchang)] == [NC_STOP]
    assert [r["device_id"] for r in world.csv("/water/stopped-meters.csv", world.two_cities)] == [NC_STOP]
    assert world.items("/water/stopped-meters", city=YINGTAN) == []
    assert world.csv("/water/stopped-meters.csv", city=YINGTAN) == []
    assert world.anonymous("/water/stopped-meters") == 401
