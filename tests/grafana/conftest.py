"""The database the Grafana tests read: three simulated days of the province mix (every family,
duplicates, late and corrupt uplinks), the scheduled analytics, a few operator acknowledgements and a
gateway heartbeat — filled once for the package."""

from __future__ import annotations

import json
import time as wallclock
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest

import iotjx.targets as targets_module
from iotjx.grafana import panels as P
from tests.conftest import fresh_database
from tests.grafana.grafana_sql import Variable, expand

DAYS = 3
INTERVAL = timedelta(minutes=15)          # what Grafana would pick for 7 days on a ~700-pixel panel


def _livelier(f):
    """Three days of a small fleet show little: more alarms and leaks, and hourly meter readings (the
    night-flow slots need a reading every hour of the night)."""
    if f.family == "fire":
        return replace(f, options={**f.options, "alarm_per_day": 1.0})
    if f.family == "water":
        return replace(f, interval_s=3600, options={**f.options, "leak": 0.3})
    return f


def extra_targets(today: date) -> str:
    """Targets added to the bundled catalogue for the Coverage board's verdicts: one met, one on track,
    one at risk, one missed at a deadline three days ago, one without a figure."""
    def operator(tid: str, value: int, deadline: date) -> str:
        return (f'[[programme]]\nid = "{tid}"\nvalue = {value}\nunit = "sites"\ndeadline = {deadline.isoformat()}\n'
                f'measure = {{ kind = "operator" }}\n\n')
    return ("\n" + operator("grafana-met", 100, today + timedelta(days=365))
            + operator("grafana-on-track", 100, today + timedelta(days=365))
            + operator("grafana-at-risk", 1000, today + timedelta(days=10))
            + operator("grafana-missed", 100, today - timedelta(days=3))
            + operator("grafana-unknown", 100, today + timedelta(days=30)))


# operator figures: (target, days before today, value)
# (days chosen so that the verdicts hold whether yesterday's snapshot is taken yet or not, just after
# local midnight)
ENTRIES = (("grafana-met", 3, 150.0), ("grafana-on-track", 4, 10.0), ("grafana-on-track", 2, 40.0),
           ("grafana-at-risk", 4, 10.0), ("grafana-at-risk", 2, 20.0), ("grafana-missed", 4, 10.0))


@pytest.fixture(scope="package")
def catalogue_file(tmp_path_factory):
    from iotjx.targets import load_catalogue

    today = datetime.now(ZoneInfo(P.LOCAL_TZ)).date()
    path = tmp_path_factory.mktemp("targets") / "catalogue.toml"
    bundled = Path(targets_module.__file__).with_name("catalogue.toml")
    path.write_text(bundled.read_text(encoding="utf-8") + extra_targets(today), encoding="utf-8")
    load_catalogue(path)                      # valid
    return path


def _fill(url: str, catalogue: Path) -> None:
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
    with psycopg.connect(url, autocommit=True) as conn:
        register_devices(conn, sim.device_records)
        # a meter registered and never heard: the Water board's silent meters
        register_devices(conn, [DeviceRecord(device_id="grafana-silent-meter", model="cjt188-nb-water-std",
                                             network="nbiot", city="Yingtan", site_kind="residential",
                                             site_name="龙岗小区", installed_at=datetime.now(UTC) - timedelta(days=5))])
        # registered over the days before (a registry imported in steps), so that the snapshots grow
        conn.execute("UPDATE device_status_log SET since = since - (1 + abs(hashtext(device_id)) % 4) * interval '1 day'")
        today = datetime.now(ZoneInfo(P.LOCAL_TZ)).date()
        for target, ago, value in ENTRIES:
            conn.execute("INSERT INTO target_progress_log (target_id, value, as_of, note, actor) "
                         "VALUES (%s, %s, %s, '', 'cli:grafana-test')", (target, value, today - timedelta(days=ago)))
    uplinks = [Uplink(device_id=r.device_id, payload=r.payload, transport=r.transport, received_at=r.t)
               for r in sim.records() if r.t <= now]
    settings = Settings(database_url=url, targets_file=catalogue)
    pipeline = Pipeline(DeviceRegistry(lambda: connect(url)), Writer(lambda: connect(url)),
                        reject_rows_per_min=settings.reject_rows_per_min)
    pipeline.process(uplinks)
    pipeline.process(uplinks[-200:])               # duplicates, counted by the gateway
    result = run_round(lambda: connect(url), settings, wait=True)
    assert result.ok, result
    # snapshots of the simulated days too (the history and pace of the Coverage board)
    fill_snapshots(lambda: connect(url), load_catalogue(settings.targets_file), settings,
                   first=today - timedelta(days=DAYS))
    with psycopg.connect(url, autocommit=True) as conn:
        # an operator acknowledges half the alarms, some within the 10 s budget and some not
        alarms = conn.execute("SELECT alarm_id, received_at FROM fire_alarms WHERE kind = 'alarm' "
                              "ORDER BY alarm_id").fetchall()
        for k, (alarm_id, received_at) in enumerate(alarms[::2]):
            acknowledge(conn, alarm_id, "grafana-test", at=received_at + timedelta(seconds=4 + 5 * (k % 3)))
        # the gateway's heartbeat row, in the shape ingest/gateway.py writes it
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


@pytest.fixture(scope="package")
def filled(pg_admin_url, template_db, catalogue_file):
    gen = fresh_database(pg_admin_url, template_db)
    url = next(gen)
    _fill(url, catalogue_file)
    yield url
    gen.close()


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


@pytest.fixture(scope="package")
def selections(filled):
    t_to = datetime.now(UTC)
    t_from = t_to - timedelta(days=7)
    with psycopg.connect(filled) as conn:
        return t_from, t_to, _selections(conn, t_from, t_to)


