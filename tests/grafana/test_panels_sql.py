"""Every panel's SQL, expanded as Grafana expands it (tests/grafana/grafana_sql.py), runs against the real
database filled with three days of the province-mix simulation (every family, duplicates, late and
corrupt uplinks) and the scheduled analytics, and returns what its panel expects: a time series a
`time` column, numbers and at most one text column (the series name), in time order; a table its named
columns.  With every variable on "All" each panel returns rows; with a few cities, one network, one
site, the SQL still runs and keeps its shape.  Both settings of the data source's TimescaleDB flag."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal

import psycopg
import pytest

from iotjx.grafana import boards
from iotjx.grafana import panels as P
from tests.grafana.conftest import DAYS, INTERVAL
from tests.grafana.grafana_sql import expand


def _panels():
    for uid, (title, panels) in boards.boards_panels().items():
        for p in panels:
            yield pytest.param(uid, p, id=f"{uid}:{p.title}")


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
            if key == "all":
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
