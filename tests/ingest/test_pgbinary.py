"""The numpy-built binary COPY stream against psycopg's own row-by-row binary COPY: the same values
through both must give the same rows in PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ingest import pgbinary
from ingest.pgbinary import Column

COLUMNS = [("t", "timestamp with time zone"), ("i2", "smallint"), ("i4", "integer"), ("i8", "bigint"),
           ("f8", "double precision"), ("b", "boolean"), ("s", "text"), ("p", "bytea"), ("j", "jsonb")]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.fixture
def conn(db_url):
    with psycopg.connect(db_url, autocommit=True) as c:
        ddl = ", ".join(f"{name} {pgtype}" for name, pgtype in COLUMNS)
        c.execute(f"CREATE TABLE via_numpy (k int, {ddl})")
        c.execute(f"CREATE TABLE via_psycopg (k int, {ddl})")
        yield c


row = st.tuples(
    st.one_of(st.none(), st.integers(-2_000_000_000_000_000, 4_000_000_000_000_000)),   # µs since 1970
    st.one_of(st.none(), st.integers(-2**15, 2**15 - 1)),
    st.one_of(st.none(), st.integers(-2**31, 2**31 - 1)),
    st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
    st.one_of(st.none(), st.floats(allow_nan=False, width=64)),
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))),
    st.one_of(st.none(), st.binary(max_size=40)),
    st.one_of(st.none(), st.dictionaries(st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                                                      blacklist_characters="\x00"), max_size=5),
                                         st.integers(-99, 99), max_size=3)),      # jsonb holds no NUL
)


def _columns(rows: list[tuple]) -> list[Column]:
    n = len(rows)
    cols = [Column("integer", np.arange(n, dtype=np.int64))]
    for k, (_, pgtype) in enumerate(COLUMNS):
        values = [r[k] for r in rows]
        null = np.array([v is None for v in values], dtype=bool)
        if pgtype == "timestamp with time zone":
            micros = np.array([0 if v is None else v for v in values], dtype=np.int64) - pgbinary.PG_EPOCH_S * 10**6
            cols.append(Column(pgtype, micros, null, micros=True))
        elif pgtype in ("smallint", "integer", "bigint"):
            cols.append(Column(pgtype, np.array([0 if v is None else v for v in values], dtype=np.int64), null))
        elif pgtype == "double precision":
            cols.append(Column(pgtype, np.array([np.nan if v is None else v for v in values], dtype=np.float64)))
        elif pgtype == "boolean":
            cols.append(Column(pgtype, np.array([bool(v) for v in values]), null))
        elif pgtype == "jsonb":
            cols.append(Column(pgtype, [None if v is None else json.dumps(v) for v in values]))
        else:
            cols.append(Column(pgtype, values))
    return cols


def _python_row(k: int, r: tuple) -> tuple:
    from psycopg.types.json import Jsonb
    t = None if r[0] is None else EPOCH + timedelta(microseconds=r[0])
    return (k, t, *r[1:8], None if r[8] is None else Jsonb(r[8]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, max_size=30))
def test_the_same_rows_as_psycopgs_binary_copy(conn, rows):
    conn.execute("TRUNCATE via_numpy, via_psycopg")
    names = "k, " + ", ".join(name for name, _ in COLUMNS)
    with conn.cursor() as cur:
        with cur.copy(f"COPY via_numpy ({names}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(pgbinary.encode(_columns(rows), len(rows)))
        with cur.copy(f"COPY via_psycopg ({names}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["integer"] + [pgtype for _, pgtype in COLUMNS])
            for k, r in enumerate(rows):
                copy.write_row(_python_row(k, r))
    a = conn.execute(f"SELECT {names} FROM via_numpy ORDER BY k").fetchall()
    b = conn.execute(f"SELECT {names} FROM via_psycopg ORDER BY k").fetchall()
    assert len(a) == len(rows) and a == b


def test_epoch_seconds_become_the_same_instants_as_datetimes(conn):
    seconds = np.array([0.0, 1.5, 1_700_000_000.123456, np.nan, 4_102_444_800.0])
    with conn.cursor() as cur:
        with cur.copy("COPY via_numpy (k, t) FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(pgbinary.encode([Column("integer", np.arange(5)),
                                        Column("timestamp with time zone", seconds)], 5))
    got = [t for (t,) in conn.execute("SELECT t FROM via_numpy ORDER BY k")]
    assert got == [None if np.isnan(s) else datetime.fromtimestamp(s, UTC) for s in seconds]


def test_no_rows_and_unknown_types():
    assert pgbinary.encode([Column("text", [])], 0) == pgbinary.SIGNATURE + pgbinary.TRAILER
    with pytest.raises(ValueError, match="numeric"):
        pgbinary.encode([Column("numeric", [1])], 1)
    with pytest.raises(ValueError, match="2 values in a block of 3"):
        pgbinary.encode([Column("text", ["a", "b"])], 3)
