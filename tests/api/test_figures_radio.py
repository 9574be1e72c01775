"""The radio routes (api/routes/radio.py) over tests/analytics/test_radio.py's simulated fleet stored
through the real pipeline: every group of the summary and the report, and the weak devices, held equal
to that module's plain-SQL recomputation, with an unscoped viewer, a Nanchang key, a two-city key and no
key (JSON and CSV)."""

from __future__ import annotations

import psycopg
import pytest

from iotjx.devices import register_devices
from tests.analytics import test_radio as fleet
from tests.api.conftest import NANCHANG, YINGTAN
from tests.api.figures_world import module_world
from tests.helpers import store_uplinks

WINDOW = {"from": fleet.SINCE.isoformat(), "to": fleet.UNTIL.isoformat()}


def _fill(db_url: str) -> None:
    records, uplinks = fleet._fleet()
    with psycopg.connect(db_url) as conn:
        register_devices(conn, records)
        # the fleet's sites were named by free text: give them catalogue codes, the API's name for a site
        conn.execute("UPDATE sites SET code = 'JX-RS-' || lpad(site_id::text, 4, '0') WHERE code IS NULL")
    assert store_uplinks(db_url, uplinks)["stored"] == len(uplinks)


@pytest.fixture(scope="module")
def world(pg_admin_url, template_db, broker):
    yield from module_world(pg_admin_url, template_db, broker, _fill)


def _shape(g: dict) -> dict:
    return {"with_radio": g["with_radio"], "without_radio": g["without_radio"],
            "rsrp": (g["rsrp_p10"], g["rsrp_p50"], g["rsrp_p90"]), "sinr": (g["sinr_p10"], g["sinr_p50"], g["sinr_p90"]),
            "with_ecl": g["with_ecl"], "ecl_share": (g["ecl0_share"], g["ecl1_share"], g["ecl2_share"]),
            "covered": g["covered"], "weak": g["weak"], "coverage_rate": g["coverage_rate"]}


def _expected(world, cities: set[int] | None) -> dict:
    """The groups recomputed in plain SQL, keyed as the API names them: (level, city, site code, cell)."""
    codes = dict(world.sql("SELECT site_id, code FROM sites"))
    with psycopg.connect(world.db_url) as conn:
        city = fleet._reference(conn, "city", -105.0, -3.0)
        site = fleet._reference(conn, "city, site_id", -105.0, -3.0)
        cell = fleet._reference(conn, "city, cell_id", -105.0, -3.0, "WHERE cell_id IS NOT NULL")
        province = fleet._reference(conn, "'all'", -105.0, -3.0, group="()")[("all",)]
    out = {("city", c, None, None): v for (c,), v in city.items()}
    out |= {("site", c, codes[s], None): v for (c, s), v in site.items()}
    out |= {("cell", c, None, k): {**v, "without_radio": None} for (c, k), v in cell.items()}
    if cities is None:
        out[("province", None, None, None)] = province
    else:
        out = {k: v for k, v in out.items() if k[1] in cities}
    return {k: fleet._approx(v) for k, v in out.items()}


def _groups(groups: list[dict]) -> dict:
    return {(g["level"], g["city"], g["site_id"], g["cell_id"]): _shape(g) for g in groups}


@pytest.mark.parametrize("who, cities", [("viewer", None), ("nanchang", {NANCHANG}),
                                         ("two_cities", {NANCHANG, YINGTAN})])
def test_summary_and_report_groups_equal_the_sql_recount(world, who, cities):
    key = getattr(world, who)
    expected = _expected(world, cities)
    assert len(expected) > 5
    summary = world.json("/radio/summary", key, **{"from": WINDOW["from"]})
    assert (summary["rsrp_min_dbm"], summary["sinr_min_db"]) == (-105.0, -3.0)
    assert _groups(summary["groups"]) == expected
    report = world.json("/radio/report", key, **WINDOW)
    assert _groups(report["groups"]) == expected
    lines = world.csv("/radio/summary.csv", key, **{"from": WINDOW["from"]})
    assert [(r["level"], r["city"], r["site_id"], r["cell_id"], int(r["with_radio"])) for r in lines] \
        == [(g["level"], str(g["city"] or ""), g["site_id"] or "", str(g["cell_id"] or ""), g["with_radio"])
            for g in summary["groups"]]
    sites = world.json("/radio/summary", key, level="site", **{"from": WINDOW["from"]})["groups"]
    assert {g["level"] for g in sites} == {"site"} and len(sites) == sum(k[0] == "site" for k in expected)


def test_weak_devices_equal_the_sql_recount(world):
    weak = {d: city for d, city in world.sql("""
        WITH w AS (SELECT * FROM radio_readings WHERE time >= %(s)s AND time < %(u)s),
        r AS (SELECT DISTINCT ON (device_id) device_id, rsrp_dbm FROM w WHERE rsrp_dbm IS NOT NULL
              ORDER BY device_id, time DESC),
        q AS (SELECT DISTINCT ON (device_id) device_id, sinr_db FROM w WHERE sinr_db IS NOT NULL
              ORDER BY device_id, time DESC)
        SELECT d.device_id, s.city_code FROM devices d LEFT JOIN sites s USING (site_id)
        LEFT JOIN r USING (device_id) LEFT JOIN q USING (device_id)
        WHERE d.status = 'active' AND (r.rsrp_dbm < -105 OR q.sinr_db < -3)""",
        {"s": fleet.SINCE, "u": fleet.UNTIL})}
    assert len(weak) > 3
    report = world.json("/radio/report", **WINDOW, weak_limit=1000)
    assert report["weak_total"] == len(weak) and {w["device_id"] for w in report["weak"]} == set(weak)
    rsrp = [w["rsrp_dbm"] for w in report["weak"] if w["rsrp_dbm"] is not None]
    assert rsrp == sorted(rsrp)
    assert all(w["uplink_success"] is None or 0 <= w["uplink_success"] <= 1 for w in report["weak"])
    assert [w["device_id"] for w in world.json("/radio/report", **WINDOW, weak_limit=2)["weak"]] \
        == [w["device_id"] for w in report["weak"][:2]]
    assert [r["device_id"] for r in world.csv("/radio/weak.csv", **WINDOW)] == [w["device_id"] for w in report["weak"]]
    nanchang = {d for d, city in weak.items() if city == NANCHANG}
    assert {w["device_id"] for w in world.json("/radio/report", world.nanchang, **WINDOW, weak_limit=1000)["weak"]} \
        == nanchang
    assert {r["device_id"] for r in world.csv("/radio/weak.csv", world.nanchang, **WINDOW)} == nanchang


def test_refusals(world):
    headers = {"Authorization": f"Bearer {world.viewer}"}
    for path, query in (("/radio/report", {"from": WINDOW["to"], "to": WINDOW["from"]}),
                        ("/radio/report", {"from": "2026-01-01T00:00:00+08:00", "to": "2026-03-01T00:00:00+08:00"}),
                        ("/radio/summary", {"from": "2099-01-01T00:00:00+08:00"}),
                        ("/radio/summary", {"from": WINDOW["from"], "level": "street"})):
        answer = world.client.get(path, params=query, headers=headers)
        assert answer.status_code == 422 and answer.headers["content-type"] == "application/problem+json", (path, query)
    scoped = world.client.get("/radio/summary", params={"from": WINDOW["from"], "city": YINGTAN},
                              headers={"Authorization": f"Bearer {world.nanchang}"})
    assert scoped.status_code == 403
    for path in ("/radio/summary", "/radio/summary.csv", "/radio/report", "/radio/weak.csv"):
        assert world.anonymous(path, **WINDOW if "summary" not in path else {"from": WINDOW["from"]}) == 401
