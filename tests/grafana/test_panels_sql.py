"""Every panel's SQL, expanded as Grafana expands it (tests/grafana/grafana_sql.py), runs against the real
database filled with three days of the province-mix simulation (every family, duplicates, late and
corrupt uplinks) and the scheduled analytics, and returns what its panel expects: a time series a
`time` column, numbers and at most one text column (the series name), in time order; a table its named
columns.  With every variable on "All" each panel returns rows; with a few cities, one network, one
site, the SQL still runs and keeps its shape.  Both settings of the data source's TimescaleDB flag."""

from __future__ import annotations

import re
import time as wallclock
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from iotjx.grafana import boards
from iotjx.grafana import panels as P
from tests.conftest import fresh_database
from tests.grafana.grafana_sql import Variable, expand

DAYS = 3
INTERVAL = timedelta(minutes=15)          # what Grafana would pick for 7 days on a ~700-pixel panel
# The panel ids of the panels whose rows depend on events the simulation may not produce in 3 days.
MAY_BE_EMPTY = {"Open leak and reverse-flow alerts"}


def _livelier(f):
    """Three days of a small fleet show little: more alarms and leaks, and hourly meter readings (the
    night-flow slots need a reading every hour of the night)."""
    if f.family == "fire":
        return replace(f, options={**f.options, "alarm_per_day": 1.0})
    if f.family == "water":
        return replace(f, interval_s=3600, options={**f.options, "leak": 0.3})
    return f


def _fill(url: str) -> None:
    from analytics.coverage import fill_snapshots
    from analytics.fire import acknowledge
    from analytics.schedule import run_round
    from ingest.pipeline import Pipeline
    from ingest.registry import DeviceRegistry
    from ingest.writer import Writer
    from iotjx.db import connect
    from iotjx.devices import DeviceRecord, register_devices
    from iotjx.model import Uplink
    from iotjx.settings import Settings
    from iotjx.targets import load_catalogue
    from simulators.engine import Simulation
    from simulators.scenario import load_scenario

    now = wallclock.time()
    base = load_scenario("province-mix").scaled(0.003)
    fleets = tuple(_livelier(replace(f, behaviour=replace(f.behaviour, duplicate=0.03, late=0.03, corrupt=0.01)))
                   for f in base.fleets)
    sim = Simulation(replace(base, fleets=fleets, start=now - DAYS * 86400 - 600, duration_s=DAYS * 86400))
    with psycopg.connect(url) as conn:
        register_devices(conn, sim.device_records)
        # a meter registered and never heard: the Water board's silent meters
        register_devices(conn, [DeviceRecord(device_id="grafana-silent-meter", model="cjt188-nb-water-std",
                                             network="nbiot", city="Yingtan", site_kind="residential",
                                             site_name="龙岗小区", installed_at=datetime.now(UTC) - timedelta(days=5))])
    uplinks = [Uplink(device_id=r.device_id, payload=r.payload, transport=r.transport, received_at=r.t)
               for r in sim.records() if r.t <= now]
    settings = Settings(database_url=url)
    pipeline = Pipeline(DeviceRegistry(lambda: connect(url)), Writer(lambda: connect(url)),
                        reject_rows_per_min=settings.reject_rows_per_min)
    pipeline.process(uplinks)
    pipeline.process(uplinks[-200:])               # duplicates, counted by the gateway
    result = run_round(lambda: connect(url), settings, wait=True)
    assert result.ok, result
    # snapshots of the simulated days too (the history and pace of the Coverage board)
    fill_snapshots(lambda: connect(url), load_catalogue(settings.targets_file), settings,
                   first=date.today() - timedelta(days=DAYS))
    with psycopg.connect(url, autocommit=True) as conn:
        # an operator acknowledges half the alarms, some within the 10 s budget and some not
        alarms = conn.execute("SELECT alarm_id, received_at FROM fire_alarms WHERE kind = 'alarm' "
                              "ORDER BY alarm_id").fetchall()
        for k, (alarm_id, received_at) in enumerate(alarms[::2]):
            acknowledge(conn, alarm_id, "grafana-test", at=received_at + timedelta(seconds=4 + 5 * (k % 3)))
        # the gateway's heartbeat row, in the shape ingest/gateway.py writes it
        import json
        conn.execute("""INSERT INTO gateway_status (gateway_id, started_at, updated_at, broker_connected, queue_depth,
                                                    counters) VALUES ('gw-test', now() - interval '1 hour', now(),
                                                    true, 0, %s)""",
                     (json.dumps({**pipeline.counters, "last_error": None, "spool": pipeline.spool_status(),
                                  "metrics": pipeline.metrics_snapshot()}),))
        # time_bucket for the TimescaleDB flag on plain PostgreSQL: TimescaleDB's documented default origin
        # for timestamptz buckets is 2000-01-03 00:00 UTC (a Monday); date_bin is PostgreSQL's own equivalent
        if not conn.execute("SELECT 1 FROM pg_proc WHERE proname = 'time_bucket'").fetchone():
            conn.execute("""CREATE FUNCTION time_bucket(bucket_width interval, ts timestamptz) RETURNS timestamptz
                            LANGUAGE sql IMMUTABLE AS
                            $$ SELECT date_bin(bucket_width, ts, timestamptz '2000-01-03 00:00:00+00') $$""")


@pytest.fixture(scope="module")
def filled(pg_admin_url, template_db):
    gen = fresh_database(pg_admin_url, template_db)
    url = next(gen)
    _fill(url)
    yield url
    gen.close()


def _panels():
    for uid, (title, panels) in boards.boards_panels().items():
        for p in panels:
            yield pytest.param(uid, p, id=f"{uid}:{p.title}")


def _options(conn, name: str, chosen: dict[str, Variable], t_from, t_to) -> tuple[str, ...]:
    label, query = P.VARIABLES[name]
    if name not in P.QUERY_VARIABLES:
        return tuple(query.split(","))
    sql = expand(query, variables=chosen, t_from=t_from, t_to=t_to, interval=INTERVAL, timescaledb=False)
    return tuple(r[1] for r in conn.execute(sql))


def _selections(conn, t_from, t_to) -> dict[str, dict[str, Variable]]:
    """All; two cities with one network; one site of one city with one pilot."""
    out: dict[str, dict[str, Variable]] = {}
    all_city = Variable(_options(conn, "city", {}, t_from, t_to))
    two = tuple(str(r[0]) for r in conn.execute(
        "SELECT s.city_code FROM devices d JOIN sites s USING (site_id) GROUP BY 1 ORDER BY count(*) DESC LIMIT 2"))
    site, city = conn.execute("SELECT s.site_id::text, s.city_code::text FROM devices d JOIN sites s USING (site_id) "
                              "WHERE d.pilot = 'water' GROUP BY 1, 2 ORDER BY count(*) DESC LIMIT 1").fetchone()
    for key, cities, network, pilot, sites in (("all", None, None, None, None),
                                              ("two-cities", two, ("nbiot",), None, None),
                                              ("one-site", (city,), None, ("water",), (site,))):
        v = {"city": replace(all_city, chosen=cities)}
        v["site"] = Variable(_options(conn, "site", v, t_from, t_to), chosen=sites)
        v["pilot"] = Variable(_options(conn, "pilot", v, t_from, t_to), chosen=pilot)
        v["network"] = Variable(_options(conn, "network", v, t_from, t_to), chosen=network)
        out[key] = v
    return out


def _number(x) -> bool:
    return x is None or (isinstance(x, (int, float, Decimal)) and not isinstance(x, bool))


def check_shape(p: P.Panel, names: list[str], rows: list[tuple]) -> None:
    if p.columns is not None:
        assert names == list(p.columns), f"{p.title}: columns {names}"
        return
    assert "time" in names, f"{p.title}: no time column in {names}"
    t = names.index("time")
    texts = [i for i, n in enumerate(names) if i != t and rows and all(isinstance(r[i], str) for r in rows)]
    assert len(texts) <= 1 and all(names[i] == "metric" for i in texts), f"{p.title}: text columns {names}"
    for r in rows:
        assert isinstance(r[t], (datetime, int, float, Decimal)), f"{p.title}: time {r[t]!r}"
        assert all(_number(v) for i, v in enumerate(r) if i != t and i not in texts), f"{p.title}: row {r}"
    times = [float(r[t].timestamp()) if isinstance(r[t], datetime) else float(r[t]) for r in rows]
    assert times == sorted(times), f"{p.title}: not in time order"


@pytest.fixture(scope="module")
def selections(filled):
    t_to = datetime.now(UTC)
    t_from = t_to - timedelta(days=7)
    with psycopg.connect(filled) as conn:
        return t_from, t_to, _selections(conn, t_from, t_to)


@pytest.mark.parametrize("timescaledb", [False, True], ids=["plain", "timescaledb"])
@pytest.mark.parametrize("uid, panel", list(_panels()))
def test_panel_sql_runs_with_the_shape_its_panel_expects(filled, selections, uid, panel, timescaledb):
    t_from, t_to, chosen = selections
    with psycopg.connect(filled) as conn:
        conn.read_only = True
        for key, variables in chosen.items():
            sql = expand(panel.sql, variables=variables, t_from=t_from, t_to=t_to, interval=INTERVAL,
                         timescaledb=timescaledb)
            assert "$" not in sql.replace("$$", ""), f"{panel.title}: left unexpanded: {sql}"
            cur = conn.execute(sql)
            names = [d.name for d in cur.description]
            rows = cur.fetchall()
            check_shape(panel, names, rows)
            if key == "all" and panel.title not in MAY_BE_EMPTY:
                assert rows, f"{uid} · {panel.title}: no rows with every variable on All"


def test_panels_name_only_tables_and_columns_the_migrations_create(filled):
    """Beyond running: every `FROM`/`JOIN` names a table of the schema (or a CTE of the same query)."""
    with psycopg.connect(filled) as conn:
        tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables "
                                             "WHERE table_schema = 'public'")}
    for uid, (title, panels) in boards.boards_panels().items():
        for p in panels:
            ctes = set(re.findall(r"(?:WITH|,)\s+(\w+)(?:\([^)]*\))?\s+AS\s+\(", p.sql))
            for name in re.findall(r"\b(?:FROM|JOIN)\s+(\w+)\b(?![.(])", p.sql):
                assert name in tables | ctes, f"{uid} · {p.title}: {name} is not a table"
    rollups = {"rollup_water_day", "rollup_water_site_15m", "rollup_fire_site_15m", "rollup_traffic_lane_5m",
               "rollup_parking_site_15m", "rollup_radio_day", "rollup_radio_cell_day", "rollup_radio_latest"}
    used = {n for _, (_, ps) in boards.boards_panels().items() for p in ps for n in re.findall(r"rollup_\w+", p.sql)}
    assert rollups <= used


def test_the_fill_spans_several_days(filled):
    with psycopg.connect(filled) as conn:
        days = conn.execute("SELECT count(DISTINCT bucket) FROM rollup_water_day").fetchone()[0]
        snapshots = conn.execute("SELECT count(*) FROM coverage_snapshot_days").fetchone()[0]
    assert days >= DAYS and snapshots >= 2


def test_figures_equal_a_plain_sql_recount(filled, selections):
    """Two panels' figures against the readings themselves: vehicles per intersection over the range, and
    meters with a low battery in their latest reading."""
    t_from, t_to, chosen = selections
    by_title = {p.title: p for p in P.TRAFFIC + P.WATER}
    with psycopg.connect(filled) as conn:
        sql = expand(by_title["Congestion grade by intersection and lane"].sql, variables=chosen["all"],
                     t_from=t_from, t_to=t_to, interval=INTERVAL, timescaledb=False)
        got = {}
        for city, site, device, lane, vehicles, *_ in conn.execute(sql):
            got[(device, lane)] = float(vehicles)
        want = {(d, int(lane)): float(v) for d, lane, v in conn.execute("""
            SELECT f.device_id, coalesce(f.channel, 0),
                   sum(coalesce(count_a, 0) + coalesce(count_b, 0) + coalesce(count_c, 0)
                       + CASE WHEN count_a IS NULL AND count_b IS NULL AND count_c IS NULL
                              THEN coalesce(round((extra->>'volume')::numeric), 0) ELSE 0 END)
              FROM traffic_flow f JOIN devices d USING (device_id) JOIN sites s USING (site_id)
             WHERE f.time BETWEEN %s AND %s GROUP BY 1, 2""", (t_from, t_to))}
        assert got and got == pytest.approx(want)
