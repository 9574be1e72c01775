"""Grafana's expansion of a PostgreSQL panel's SQL, written from Grafana's documented behaviour and its
source as facts (not copied): public/app/features/plugins/sql/datasource/SqlDatasource.ts
(`interpolateVariable`), pkg/tsdb/grafana-postgresql-datasource/sqleng/sql_engine.go (`Interpolate`)
and macros.go (`postgresMacroEngine`), Grafana 11.  In the order Grafana applies them:

1. template variables (the browser): a value of a multi-value or include-All variable is quoted as an
   SQL literal ('' for '), several values joined with ','; "All" without a custom all value is every
   option's value; a single-valued plain variable is inserted with its quotes doubled, unquoted;
2. global substitutions (the server): `$__interval_ms`, `$__interval` (Go's gtime.FormatInterval:
   the largest whole unit of y, d, h, m, s, ms), `$__unixEpochFrom()`, `$__unixEpochTo()`;
3. the macros `$name(args)` (the pattern ``\\$(\\w+)\\(([^)]*)\\)``: arguments end at the first ')' and are
   split on ','): `$__time`, `$__timeEpoch`, `$__timeFilter` (BETWEEN, inclusive, RFC 3339 UTC),
   `$__timeFrom()`, `$__timeTo()`, `$__timeGroup(col, interval)` (``time_bucket('<s>.000s',col)`` with
   the data source's TimescaleDB flag, else ``floor(extract(epoch from col)/<s>)*<s>``; followed directly
   by ',' it becomes `$__timeGroupAlias`), `$__timeGroupAlias` (… AS "time"), `$__unixEpochFilter`,
   `$__unixEpochGroup[Alias]`.  An unknown macro is an error, as in Grafana."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_interval(text: str) -> float:
    """Seconds of a Grafana interval such as '5m', '1d', '300ms'."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w|y)", text.strip().strip("'"))
    if not m:
        raise ValueError(f"error parsing interval {text}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def format_interval(seconds: float) -> str:
    """Go's gtime.FormatInterval: the count of the largest unit that fits, truncated."""
    ms = round(seconds * 1000)
    for unit, size in (("y", 31536000000), ("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000), ("ms", 1)):
        if ms >= size:
            return f"{ms // size}{unit}"
    return "1ms"


def _go_float(x: float) -> str:
    """Go's %v of a float64 (shortest form; exponent form from 1e21, as strconv's 'g' with precision -1
    switches at an exponent of 21 for %v)."""
    return str(int(x)) if x == int(x) and abs(x) < 1e21 else repr(x)


def rfc3339nano(t: datetime) -> str:
    """Go's time.RFC3339Nano of a UTC time: fractional seconds without trailing zeros, 'Z'."""
    t = t.astimezone(UTC)
    frac = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


@dataclass(frozen=True)
class Variable:
    """A template variable's state: the chosen values (None: "All") and the options "All" stands for."""

    options: tuple[str, ...]
    chosen: tuple[str, ...] | None = None
    multi: bool = True
    include_all: bool = True

    def values(self) -> tuple[str, ...]:
        return self.options if self.chosen is None else self.chosen


def _literal(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def interpolate_variables(sql: str, variables: dict[str, Variable]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        var = variables.get(name)
        if var is None:
            return m.group(0)                   # not a dashboard variable ($__… are the server's)
        values = var.values()
        if var.multi or var.include_all:
            return ",".join(_literal(v) for v in values)
        (value,) = values
        return value.replace("'", "''")
    return re.sub(r"\$\{(\w+)\}|\$(?!__)(\w+)", one, sql)


def interpolate_global(sql: str, t_from: datetime, t_to: datetime, interval: timedelta) -> str:
    sql = sql.replace("$__interval_ms", str(int(interval.total_seconds() * 1000)))
    sql = sql.replace("$__interval", format_interval(interval.total_seconds()))
    sql = sql.replace("$__unixEpochFrom()", str(int(t_from.timestamp())))
    return sql.replace("$__unixEpochTo()", str(int(t_to.timestamp())))


def _macro(name: str, args: list[str], t_from: datetime, t_to: datetime, timescaledb: bool) -> str:
    if name == "__time":
        return f'{args[0]} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {args[0]}) as "time"'
    if name == "__timeFilter":
        return f"{args[0]} BETWEEN '{rfc3339nano(t_from)}' AND '{rfc3339nano(t_to)}'"
    if name == "__timeFrom":
        return f"'{rfc3339nano(t_from)}'"
    if name == "__timeTo":
        return f"'{rfc3339nano(t_to)}'"
    if name in ("__timeGroup", "__timeGroupAlias"):
        if len(args) < 2:
            raise ValueError(f"macro {name} needs time column and interval and optional fill value")
        s = parse_interval(args[1])
        group = (f"time_bucket('{s:.3f}s',{args[0]})" if timescaledb
                 else f"floor(extract(epoch from {args[0]})/{_go_float(s)})*{_go_float(s)}")
        return group + (' AS "time"' if name == "__timeGroupAlias" else "")
    if name == "__unixEpochFilter":
        return f"{args[0]} >= {int(t_from.timestamp())} AND {args[0]} <= {int(t_to.timestamp())}"
    if name in ("__unixEpochGroup", "__unixEpochGroupAlias"):
        s = parse_interval(args[1])
        group = f"floor(({args[0]})/{_go_float(s)})*{_go_float(s)}"
        return group + (' AS "time"' if name == "__unixEpochGroupAlias" else "")
    raise ValueError(f"unknown macro {name!r}")


def interpolate_macros(sql: str, t_from: datetime, t_to: datetime, timescaledb: bool) -> str:
    pattern = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")
    original = sql

    def one(m: re.Match) -> str:
        name = m.group(1)
        if name == "__timeGroup":
            # Grafana looks at the first occurrence of the same text in the query: a ',' right after
            # it means the pre-5.3 use, which added the alias.
            at = original.find(m.group(0))
            end = at + len(m.group(0))
            if at >= 0 and end < len(original) and original[end] == ",":
                name = "__timeGroupAlias"
        args = [a.strip(" ") for a in m.group(2).split(",")]
        return _macro(name, args, t_from, t_to, timescaledb)
    return pattern.sub(one, sql)


def expand(sql: str, *, variables: dict[str, Variable], t_from: datetime, t_to: datetime,
           interval: timedelta, timescaledb: bool) -> str:
    """The SQL Grafana sends to PostgreSQL for a panel."""
    sql = interpolate_variables(sql, variables)
    sql = interpolate_global(sql, t_from, t_to, interval)
    return interpolate_macros(sql, t_from, t_to, timescaledb)
