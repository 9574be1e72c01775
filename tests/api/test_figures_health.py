"""The device-health routes (api/routes/health.py) and the offline fire devices (api/routes/fire.py)
over the Device health story (tests/analytics/test_health.py: water meters, parking sensors, NB smoke
detectors and a UITD in three cities, a silent meter, malformed senders, low batteries of each shape)
stored through the real pipeline; each figure recomputed in plain SQL, with an unscoped viewer, a
Nanchang key, a two-city key and no key (JSON and CSV)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from iotjx.devices import register_devices
from tests.analytics import test_health as story
from tests.api.conftest import NANCHANG, YINGTAN
from tests.api.figures_world import module_world

JIUJIANG = 360400


def _fill(db_url: str) -> None:
    story.NOW = datetime.now(UTC).replace(microsecond=0)         # the story told relative to this module's start
    story.INSTALLED = story.NOW - timedelta(days=3)
    with psycopg.connect(db_url) as conn:
        register_devices(conn, story._records())
    ok, bad = story._story()
    counters = story._process(db_url, ok + bad)
    assert counters["stored"] == len(ok) and counters["rejected"] == len(bad), counters


@pytest.fixture(scope="module")
def world(pg_admin_url, template_db, broker):
    yield from module_world(pg_admin_url, template_db, broker, _fill)


def _in(cities: set[int] | None, city: int | None) -> bool:
    return cities is None or city in cities


KEYS = [("viewer", None), ("nanchang", {NANCHANG}), ("two_cities", {NANCHANG, YINGTAN})]


@pytest.mark.parametrize("who, cities", KEYS)
def test_online_rates_equal_live_over_active_counted_in_sql(world, who, cities):
    key = getattr(world, who)
    report = world.json("/health/report", key)
    now = datetime.fromisoformat(report["now"])
    want = {}
    for city, pilot, network, active, live in world.sql("""
            SELECT s.city_code, d.pilot, d.network, count(*) FILTER (WHERE d.status = 'active'),
                   count(*) FILTER (WHERE d.status = 'active' AND EXISTS (
                       SELECT 1 FROM raw_uplinks r WHERE r.device_id = d.device_id AND r.outcome = 'stored'
                         AND r.received_at >= %(t)s - interval '1 second' * 1.5
                             * coalesce(d.reporting_interval_s, m.reporting_interval_s)))
            FROM devices d JOIN device_models m USING (model) JOIN sites s USING (site_id)
            GROUP BY 1, 2, 3""", {"t": now}):
        if _in(cities, city):
            want[(city, pilot, network)] = (active, live, pytest.approx(live / active) if active else None)
    assert {(r["city"], r["pilot"], r["network"]): (r["active"], r["online"], r["rate"]) for r in report["online"]} \
        == want
    lines = world.csv("/health/online.csv", key)
    assert {(int(r["city"]), r["pilot"], r["network"]): (int(r["active"]), int(r["online"])) for r in lines} \
        == {k: v[:2] for k, v in want.items()}


_NOT_LIVE = """
    SELECT d.device_id, s.city_code,
           (SELECT count(*) FROM rejected_uplinks x WHERE x.device_id = d.device_id
              AND x.received_at > %(t)s - interval '1 second' * 1.5 * m.reporting_interval_s
              AND x.received_at <= %(t)s) AS rejects
    FROM devices d JOIN device_models m USING (model) LEFT JOIN sites s ON s.site_id = d.site_id
    LEFT JOIN raw_uplinks r ON r.device_id = d.device_id AND r.outcome = 'stored'
    WHERE d.status = 'active' AND d.installed_at <= %(t)s
    GROUP BY d.device_id, s.city_code, m.reporting_interval_s
    HAVING coalesce(max(r.received_at) < %(t)s - interval '1 second' * 1.5 * m.reporting_interval_s, true)"""


@pytest.mark.parametrize("who, cities", KEYS)
def test_silent_malformed_and_batteries_of_the_report(world, who, cities):
    key = getattr(world, who)
    report = world.json("/health/report", key)
    rows = world.sql(_NOT_LIVE, {"t": datetime.fromisoformat(report["now"])})
    silent = {d for d, city, n in rows if n == 0 and _in(cities, city)}
    malformed = {d for d, city, n in rows if n > 0 and _in(cities, city)}
    assert {d["device_id"] for d in report["silent"]} == silent and report["silent_total"] == len(silent)
    assert {d["device_id"] for d in report["malformed"]} == malformed and report["malformed_total"] == len(malformed)
    since = [d["since"] for d in report["silent"]]
    assert since == sorted(since)                                   # longest silent first
    # the story's low batteries (one of each shape), and every active device counted once
    low = {story.W_LOW: YINGTAN, story.P_MV: NANCHANG, story.P_BIT: NANCHANG, story.S_LOW: JIUJIANG,
           story.P_JSON: YINGTAN}
    assert {b["device_id"] for b in report["low_batteries"]} == {d for d, c in low.items() if _in(cities, c)}
    active = [c for c, in world.sql("""SELECT s.city_code FROM devices d JOIN sites s USING (site_id)
                                       WHERE d.status = 'active'""")]
    assert sum(report["batteries"].values()) == sum(_in(cities, c) for c in active)
    assert report["batteries"]["low"] == len(report["low_batteries"])
    assert (report["suppressed_rejects"] is None) == (cities is not None)
    if cities is None:
        assert silent == {story.W_SILENT, story.W_NEVER, story.UITD} and malformed == {story.W_BAD, story.S_BAD}
        cut = world.json("/health/report", key, limit=1)
        assert [d["device_id"] for d in cut["silent"]] == [report["silent"][0]["device_id"]]
        assert cut["silent_total"] == len(silent)


@pytest.mark.parametrize("who, cities", KEYS)
def test_uplink_success_equals_received_over_expected_in_sql(world, who, cities):
    key = getattr(world, who)
    since, until = story.NOW - timedelta(hours=24), story.NOW
    window = {"from": since.isoformat(), "to": until.isoformat()}
    want = {}
    for dev, city, received, expected in world.sql("""
            SELECT d.device_id, s.city_code,
                   (SELECT count(*) FROM raw_uplinks r WHERE r.device_id = d.device_id AND r.outcome = 'stored'
                      AND r.received_at >= greatest(%(s)s, d.installed_at) AND r.received_at < %(u)s),
                   floor(extract(epoch FROM %(u)s - greatest(%(s)s, d.installed_at))
                         / coalesce(d.reporting_interval_s, m.reporting_interval_s))::int
            FROM devices d JOIN device_models m USING (model) LEFT JOIN sites s ON s.site_id = d.site_id
            WHERE d.status = 'active' AND d.installed_at < %(u)s""", {"s": since, "u": until}):
        if _in(cities, city):
            want[dev] = (received, expected, min(1.0, received / expected) if expected else None)
    got = world.items("/health/uplink-success", key, **window)
    assert [u["device_id"] for u in got] == sorted(want)
    assert {u["device_id"]: (u["received"], u["expected"], u["success"]) for u in got} == {
        d: (r, e, pytest.approx(s) if s is not None else None) for d, (r, e, s) in want.items()}
    lines = world.csv("/health/uplink-success.csv", key, **window)
    assert [(r["device_id"], int(r["received"])) for r in lines] == [(u["device_id"], u["received"]) for u in got]
    if cities is None:
        assert {story.P_HALF: 0.5, story.P_OK: 1.0}.items() <= {u["device_id"]: u["success"] for u in got}.items()


@pytest.mark.parametrize("who, cities", KEYS)
def test_offline_fire_devices_equal_a_plain_sql_recount(world, who, cities):
    key = getattr(world, who)
    want = {d: city for d, city in world.sql("""
        SELECT d.device_id, s.city_code FROM devices d JOIN device_models m USING (model)
        LEFT JOIN sites s ON s.site_id = d.site_id
        LEFT JOIN LATERAL (SELECT max(received_at) AS last FROM raw_uplinks r
                           WHERE r.device_id = d.device_id AND r.outcome = 'stored') u ON true
        WHERE m.pilot = 'fire' AND d.status = 'active' AND d.installed_at <= now()
          AND coalesce(u.last, d.installed_at)
              < now() - 2 * coalesce(d.reporting_interval_s, m.reporting_interval_s) * interval '1 second'""")
        if _in(cities, city)}
    got = world.items("/fire/offline", key)
    assert [d["device_id"] for d in got] == sorted(want)
    assert all(d["city"] == want[d["device_id"]] for d in got)
    lines = world.csv("/fire/offline.csv", key)
    assert {r["device_id"] for r in lines} == set(want)
    assert [float(r["silent_s"]) for r in lines] == sorted((float(r["silent_s"]) for r in lines), reverse=True)
    if cities is None:
        assert set(want) == {story.S_BAD, story.UITD}        # the story: silent 2 days (daily), never heard (300 s)


def test_refusals(world):
    headers = {"Authorization": f"Bearer {world.viewer}"}
    for path, query in (("/health/uplink-success", {"from": "2026-03-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}),
                        ("/health/uplink-success", {"from": "2026-01-01T00:00:00Z", "to": "2026-03-01T00:00:00Z"}),
                        ("/health/report", {"limit": 5000}), ("/fire/offline", {"town": "x"}),
                        ("/fire/offline", {"cursor": "bm90IGEgY3Vyc29y"})):
        answer = world.client.get(path, params=query, headers=headers)
        assert answer.status_code == 422 and answer.headers["content-type"] == "application/problem+json", (path, query)
    for path in ("/health/report", "/health/online.csv", "/fire/offline", "/fire/offline.csv"):
        assert world.anonymous(path) == 401
        scoped = world.client.get(path, params={"city": JIUJIANG}, headers={"Authorization": f"Bearer {world.nanchang}"})
        assert scoped.status_code == 403
