"""The expander used by the panel tests, held to the expansions Grafana's own tests state for its
PostgreSQL macro engine (pkg/tsdb/grafana-postgresql-datasource/macros_test.go: inputs and expected
strings as facts) and to the SQL data source's documented variable formatting."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from iotjx.grafana import boards
from tests.grafana.grafana_sql import (Variable, expand, format_interval, interpolate_global, interpolate_macros,
                                       interpolate_variables, rfc3339nano)

FROM = datetime(2018, 4, 12, 18, 0, tzinfo=UTC)
TO = FROM + timedelta(minutes=5)


def macros(sql: str, timescaledb: bool = False, t_from=FROM, t_to=TO) -> str:
    return interpolate_macros(sql, t_from, t_to, timescaledb)


@pytest.mark.parametrize("sql, want", [
    ("select $__time(time_column)", 'select time_column AS "time"'),
    ("select min($__time(time_column))", 'select min(time_column AS "time")'),
    ("WHERE $__timeFilter(time_column)", "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"),
    ("select $__timeFrom()", "select '2018-04-12T18:00:00Z'"),
    ("select $__timeTo()", "select '2018-04-12T18:05:00Z'"),
    ("SELECT $__timeGroup(time_column,'5m'), value", 'SELECT floor(extract(epoch from time_column)/300)*300 AS "time", value'),
    ("SELECT $__timeGroup(time_column,'5m') as time, value", "SELECT floor(extract(epoch from time_column)/300)*300 as time, value"),
    ("SELECT $__timeGroup(time_column,'5m')", "SELECT floor(extract(epoch from time_column)/300)*300"),
    ("SELECT $__timeGroupAlias(time_column,'5m')", 'SELECT floor(extract(epoch from time_column)/300)*300 AS "time"'),
    ("$__timeGroup(time_column , '5m')", "floor(extract(epoch from time_column)/300)*300"),
    ("select $__unixEpochFilter(time)", f"select time >= {int(FROM.timestamp())} AND time <= {int(TO.timestamp())}"),
    ("SELECT $__unixEpochGroup(time_column+time_adjustment,'5m')", "SELECT floor((time_column+time_adjustment)/300)*300"),
])
def test_macros_as_grafanas_tests_state(sql, want):
    assert macros(sql) == want


@pytest.mark.parametrize("sql, want", [
    ("GROUP BY $__timeGroup(time_column,'5m')", "GROUP BY time_bucket('300.000s',time_column)"),
    ("GROUP BY $__timeGroup(time_column , '5m')", "GROUP BY time_bucket('300.000s',time_column)"),
    ("GROUP BY $__timeGroup(time_column , '12d')", "GROUP BY time_bucket('1036800.000s',time_column)"),
    ("GROUP BY $__timeGroup(time_column , '20ms')", "GROUP BY time_bucket('0.020s',time_column)"),
])
def test_time_group_with_the_timescaledb_flag(sql, want):
    assert macros(sql, timescaledb=True) == want


def test_times_are_rfc3339nano_and_unknown_macros_fail():
    t = datetime(1960, 2, 1, 7, 0, 0, 500000, tzinfo=UTC)
    assert rfc3339nano(t) == "1960-02-01T07:00:00.5Z"
    with pytest.raises(ValueError, match="unknown macro"):
        macros("SELECT $__nope(x)")


def test_global_substitutions():
    sql = "SELECT $__interval_ms, '$__interval', $__unixEpochFrom(), $__unixEpochTo()"
    got = interpolate_global(sql, FROM, TO, timedelta(minutes=10))
    assert got == f"SELECT 600000, '10m', {int(FROM.timestamp())}, {int(TO.timestamp())}"
    assert [format_interval(s) for s in (0.02, 1, 90, 3600, 86400 * 2, 86400 * 400)] == \
        ["20ms", "1s", "1m", "1h", "2d", "1y"]


def test_variables_multi_all_and_single():
    v = {"city": Variable(("360100", "360600"), chosen=("360600",)),
         "site": Variable(("1", "2", "3")),                                  # All: every option
         "name": Variable(("O'Hara",), chosen=("O'Hara",), multi=False, include_all=False)}
    sql = "city IN ($city) AND site IN (${site}) AND n = '$name' AND t > $__timeFrom()"
    assert interpolate_variables(sql, v) == \
        "city IN ('360600') AND site IN ('1','2','3') AND n = 'O''Hara' AND t > $__timeFrom()"
    assert interpolate_variables("x IN ($city)", {"city": Variable(("a'b", "c"))}) == "x IN ('a''b','c')"


def test_expand_runs_the_three_steps_in_grafanas_order():
    sql = "SELECT $__timeGroupAlias(t, $__interval), v FROM x WHERE $__timeFilter(t) AND c IN ($city)"
    got = expand(sql, variables={"city": Variable(("1", "2"))}, t_from=FROM, t_to=TO,
                 interval=timedelta(minutes=5), timescaledb=True)
    assert got == ("SELECT time_bucket('300.000s',t) AS \"time\", v FROM x WHERE t BETWEEN '2018-04-12T18:00:00Z' "
                   "AND '2018-04-12T18:05:00Z' AND c IN ('1','2')")


def test_no_panel_sql_has_comments_or_nested_macro_arguments():
    """Newer Grafana strips SQL comments before expanding; a macro's arguments end at the first ')'."""
    for uid, (_, panels) in boards.boards_panels().items():
        for p in panels:
            assert "--" not in p.sql and "/*" not in p.sql, p.title
            for args in re.findall(r"\$__\w+\(([^)]*)\)", p.sql):
                assert "(" not in args, (p.title, args)
