"""The one writer: what a batch writes (`WriteSet`, built from uplinks by `ingest.batch.BatchBuilder`)
goes to the database with COPY, in one transaction (`Writer`, `Transaction`)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from iotjx.db.migrations import ensure_partitions
from iotjx.model import Device, Outcome, Uplink

from . import pgbinary
from .aggregates import Aggregator, batch_rows, bucket_days, device_keys, stage_tables_sql
from .pgbinary import Column
from .rejects import reject_source, tally_rejects
from .sinks import RADIO

log = logging.getLogger(__name__)

STORED = Outcome("stored")
DUPLICATE = Outcome("duplicate")
# Written to the gateway's on-disk journal, fsync'd: durable, acknowledged, stored when the database
# takes it.  Transports answer it as a success (MQTT PUBACK, CoAP 2.04, HTTP 202).
SPOOLED = Outcome("spooled", None, "kept in the gateway's journal until the database takes it")
RAW_COLUMNS = ("received_at", "device_id", "transport", "payload", "meta", "outcome")
REJECT_COLUMNS = ("received_at", "device_id", "transport", "codec", "payload", "reason", "detail", "meta")


@dataclass(slots=True)
class WriteSet:
    """Everything one batch adds: readings per table, rejects, the raw log, and device liveness."""

    readings: dict[str, tuple[tuple[str, ...], list[tuple]]] = field(default_factory=dict)
    blocks: list[tuple[str, tuple[str, ...], list[Column], int]] = field(default_factory=list)   # columnar rows
    rejects: list[tuple] = field(default_factory=list)      # REJECT_COLUMNS; their raw-log rows are derived
    reject_sources: list[str] = field(default_factory=list)  # beside `rejects`: who sent each (rate limits)
    reject_at: list[float] = field(default_factory=list)     # beside `rejects`: received_at, epoch seconds
    # None: every reject is written; else beside `rejects`, False for one only counted in reject_tally.
    reject_kept: list[bool] | None = None
    suppressed: Counter[tuple[str, str, str]] = field(default_factory=Counter)   # (transport, source, reason)
    raw: list[tuple] = field(default_factory=list)
    # Device liveness (device_state): one (device, received_at) per stored uplink, aggregated at
    # write time with numpy (`liveness`) rather than merged in Python per uplink.
    seen_ids: list[str] = field(default_factory=list)
    seen_at: list[float] = field(default_factory=list)
    days: set[date] = field(default_factory=set)
    devices: dict[str, Device] = field(default_factory=dict)           # the batch's registry lookup (rollup keys)
    outcomes: dict[int, Outcome] = field(default_factory=dict)          # id(uplink) -> outcome
    codecs: dict[int, str] = field(default_factory=dict)                # id(uplink) -> codec (metrics)
    origin: dict[int, int] = field(default_factory=dict)                # id(opened envelope) -> id(as received)
    stored: int = 0
    duplicates: int = 0

    def outcome(self, u: Uplink) -> Outcome:
        return self.outcomes.get(id(u), STORED)

    def codec(self, u: Uplink) -> str | None:
        """The codec that decided this uplink's fate (None: it never reached a decoder)."""
        return self.codecs.get(id(u))

    def alias(self, opened: Uplink, received: Uplink) -> None:
        """`opened` (an envelope's content) answers for `received`: outcomes go to the latter."""
        self.origin[id(opened)] = self.origin.get(id(received), id(received))

    def _set(self, u: Uplink, outcome: Outcome, codec: str | None = None) -> None:
        key = self.origin.get(id(u), id(u))
        self.outcomes[key] = outcome
        if codec:
            self.codecs[key] = codec

    def add_duplicate(self, u: Uplink, codec: str | None = None) -> None:
        """Seen before (a retransmission or a redelivery): logged, acknowledged, not stored again."""
        self.add_raw(u, "duplicate")
        self.duplicates += 1
        self._set(u, DUPLICATE, codec)

    def add_raw(self, u: Uplink, outcome: str) -> None:
        when = datetime.fromtimestamp(u.received_at, UTC)
        self.days.add(when.date())
        self.raw.append((when, u.device_id, u.transport, u.payload, Jsonb(u.meta) if u.meta else None, outcome))

    def add_reject(self, u: Uplink, codec: str | None, reason: str, detail: str,
                   payload: bytes | None = None) -> None:
        """Kept in the rejects table and the raw log with the reason (`payload`: what to keep of the
        bytes, when not all of them), unless `Transaction.tally_rejects` counts it instead."""
        when = datetime.fromtimestamp(u.received_at, UTC)
        self.days.add(when.date())
        self.rejects.append((when, u.device_id, u.transport, codec, u.payload if payload is None else payload,
                             reason, detail, Jsonb(u.meta) if u.meta else None))
        self.reject_sources.append(reject_source(u))
        self.reject_at.append(u.received_at)
        self._set(u, Outcome("rejected", reason, detail), codec)

    def kept_rejects(self) -> list[tuple]:
        """The reject rows to write (all of them unless a tally suppressed some)."""
        if self.reject_kept is None:
            return self.rejects
        return [r for r, keep in zip(self.rejects, self.reject_kept, strict=True) if keep]

    def add_block(self, table: str, columns: tuple[str, ...], values: list[Column], rows: int) -> None:
        """Rows given as columns (`ingest.pgbinary`): COPYed without a Python tuple per row."""
        if rows:
            self.blocks.append((table, columns, values, rows))

    def add_stored_block(self, uplinks: Sequence[Uplink], received_at: np.ndarray, codec: str) -> None:
        """`add_stored` for many uplinks at once: their raw-log rows go as one block."""
        n = len(uplinks)
        if not n:
            return
        metas = [json.dumps(u.meta, default=str) if u.meta else None for u in uplinks]
        ids = [u.device_id for u in uplinks]
        self.add_block("raw_uplinks", RAW_COLUMNS, [
            Column("timestamp with time zone", received_at), Column("text", ids),
            Column("text", [u.transport for u in uplinks]), Column("bytea", [u.payload for u in uplinks]),
            Column("jsonb", metas), Column("text", ["stored"] * n)], n)
        first_day = datetime.fromtimestamp(float(received_at.min()), UTC).date()
        last_day = datetime.fromtimestamp(float(received_at.max()), UTC).date()
        self.days.update(first_day + timedelta(days=k) for k in range((last_day - first_day).days + 1))
        self.stored += n
        origin = self.origin
        keys = [origin.get(id(u), id(u)) for u in uplinks] if origin else [id(u) for u in uplinks]
        self.codecs.update(dict.fromkeys(keys, codec))
        self.seen_ids.extend(ids)
        self.seen_at.extend(received_at.tolist())

    def add_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        if rows:
            self.readings.setdefault(table, (columns, []))[1].extend(rows)

    def add_event(self, u: Uplink, outcome: str, radio: tuple | None, codec: str | None = None) -> None:
        """A device event without a reading (a carrier's online/offline notice): logged, acknowledged."""
        self.add_raw(u, outcome)
        if radio is not None:
            self.add_rows(RADIO.table, RADIO.all_columns, [radio])
        self._set(u, Outcome("stored", None, outcome), codec)

    def add_stored(self, u: Uplink, codec: str | None = None) -> None:
        self.add_raw(u, "stored")
        self.stored += 1
        self._stored(u, codec)

    def _stored(self, u: Uplink, codec: str | None) -> None:
        """A stored uplink's codec (metrics) and its device's liveness (device_state)."""
        if codec:
            self.codecs[self.origin.get(id(u), id(u))] = codec
        self.seen_ids.append(u.device_id)
        self.seen_at.append(u.received_at)

    def liveness(self) -> tuple[list[str], list[float], list[float], list[int]]:
        """Per device with stored uplinks, in sorted order (every writer locks device_state rows in
        this one order, so concurrent batches cannot deadlock): first and last received_at, count."""
        if not self.seen_ids:
            return [], [], [], []
        devices, which = np.unique(np.array(self.seen_ids), return_inverse=True)
        at = np.asarray(self.seen_at, dtype=np.float64)
        first = np.full(len(devices), np.inf)
        last = np.full(len(devices), -np.inf)
        np.minimum.at(first, which, at)
        np.maximum.at(last, which, at)
        return devices.tolist(), first.tolist(), last.tolist(), np.bincount(which, minlength=len(devices)).tolist()


_SEEN_UPSERT = """
    INSERT INTO device_state AS s (device_id, first_seen, last_seen, uplinks)
    SELECT device_id, to_timestamp(first_s), to_timestamp(last_s), n
    FROM unnest(%b::text[], %b::float8[], %b::float8[], %b::int8[]) AS t(device_id, first_s, last_s, n)
    ON CONFLICT (device_id) DO UPDATE SET
        first_seen = least(s.first_seen, excluded.first_seen),
        last_seen = greatest(s.last_seen, excluded.last_seen),
        uplinks = s.uplinks + excluded.uplinks"""


_SHANGHAI = ZoneInfo("Asia/Shanghai")


class Writer:
    """Owns one connection; `write` commits a WriteSet or raises, leaving nothing half-written.

    With an `aggregator` (the default: rollups in Asia/Shanghai days; the gateway passes IOTJX_TIMEZONE,
    or None with IOTJX_ROLLUPS=false) every write also merges the rows' rollups in the same
    transaction (`ingest.aggregates`)."""

    def __init__(self, connect: Callable[[], psycopg.Connection], *,
                 aggregator: Aggregator | None | bool = True) -> None:
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self._partition_days: set[date] = set()
        self.aggregator = Aggregator(_SHANGHAI) if aggregator is True else aggregator or None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = self._connect()
            with conn.transaction():           # outside any batch: a rolled-back batch cannot undo it
                conn.execute(_CLAIM_TABLE)
                if self.aggregator is not None:
                    for sql in stage_tables_sql(self.aggregator.levels):
                        conn.execute(sql)
            self._conn = conn
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One database transaction for a batch: claim its dedup keys, then write its rows."""
        conn = self.conn
        try:
            self._ensure_days(conn, {datetime.now(UTC).date()})
            with conn.transaction():
                yield Transaction(self, conn)
        except psycopg.OperationalError:
            self.close()
            raise

    def write(self, ws: WriteSet) -> None:
        """Write a WriteSet in a transaction of its own (no dedup claim)."""
        with self.transaction() as tx:
            tx.write(ws)

    def purge_dedup(self, window_s: float) -> int:
        """Forget dedup keys older than the window (they can no longer make a duplicate), by their
        uplink's time and by the time they were claimed: a replay's keys (original, older times) stay
        a window of the gateway's clock, as long as a replay at real speed or faster may send a copy."""
        with self.conn.transaction():
            cur = self.conn.execute("DELETE FROM uplink_dedup WHERE received_at < now() - make_interval(secs => %s) "
                                    "AND claimed_at < now() - make_interval(secs => %s)", (window_s, window_s))
            return cur.rowcount

    def _write_in(self, conn: psycopg.Connection, ws: WriteSet) -> None:
        partials = []
        if self.aggregator is not None and (ws.readings or ws.blocks):
            rows = batch_rows(ws.readings, ws.blocks)
            if rows:
                partials = self.aggregator.partials(rows, device_keys(conn, rows, ws.devices))
        self._ensure_days(conn, ws.days | bucket_days(partials) if partials else ws.days)
        with conn.cursor() as cur:
            for table, (columns, rows) in ws.readings.items():
                if rows:
                    _copy(cur, table, columns, rows)
            for table, columns, values, rows in ws.blocks:
                _copy_block(cur, table, columns, values, rows)
            kept = ws.kept_rejects()
            if kept:
                _copy(cur, "rejected_uplinks", REJECT_COLUMNS, kept)
            raw = ws.raw
            if kept:         # a reject's raw-log row: its own bytes (as kept), meta and reason
                raw = raw + [(r[0], r[1], r[2], r[4], r[7], f"rejected:{r[5]}") for r in kept]
            if raw:
                _copy(cur, "raw_uplinks", RAW_COLUMNS, raw)
            if ws.seen_ids:
                cur.execute(_SEEN_UPSERT, ws.liveness())   # sorted: no deadlock between replicas
            if partials:                                   # last, in one order of levels and keys
                self.aggregator.write(cur, partials, _copy_block)

    def _ensure_days(self, conn: psycopg.Connection, days: set[date]) -> None:
        new = days - self._partition_days
        if not new:
            return
        with conn.transaction():      # a savepoint when called inside the batch's transaction
            ensure_partitions(conn, min(new) - timedelta(days=1), max(new) + timedelta(days=2))
        self._partition_days |= {min(new) + timedelta(days=k) for k in range(-1, (max(new) - min(new)).days + 3)}

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


# The batch's keys go in by binary COPY (no per-key parameter dumping), then one statement claims
# them and returns only the positions that were *not* new — usually none.
_CLAIM_TABLE = """
    CREATE TEMP TABLE IF NOT EXISTS iotjx_claim (i integer, device_id text, key bytea, received_at timestamptz,
                                                 window_s double precision) ON COMMIT DELETE ROWS"""
_CLAIM = """
    WITH claimed AS (
        INSERT INTO uplink_dedup AS d (device_id, key, received_at, window_s)
        SELECT device_id, key, received_at, window_s FROM iotjx_claim ORDER BY device_id, key
        ON CONFLICT (device_id, key) DO UPDATE SET received_at = excluded.received_at, window_s = excluded.window_s,
            claimed_at = now()
            WHERE d.received_at < excluded.received_at - make_interval(secs => excluded.window_s)
        RETURNING device_id, key)
    SELECT c.i FROM iotjx_claim c
    WHERE NOT EXISTS (SELECT FROM claimed x WHERE x.device_id = c.device_id AND x.key = c.key)"""
CLAIM_COLUMNS = ("i", "device_id", "key", "received_at", "window_s")


class Transaction:
    """The batch's transaction: `claim` decides which uplinks are new, `write` adds the rows."""

    def __init__(self, writer: Writer, conn: psycopg.Connection) -> None:
        self._writer = writer
        self._conn = conn

    def claim(self, keys: Sequence[tuple[str, bytes]], received_at: Sequence[float],
              window_s: float | Sequence[float]) -> list[bool]:
        """For each (device, key): True when no uplink with that key was stored within its window
        before it (one window for all, or one per key; 0 = never a duplicate).  Atomic across
        gateways: a concurrent claim of the same key waits for this transaction; keys are inserted in
        one order (device, key) by every gateway, so two claims cannot deadlock.  A key the batch
        holds more than once is claimed once per copy, in the order of their `received_at` (a
        replay at full speed brings identical frames of a quiet lane, 15 minutes apart by their
        original times, in one batch: each is judged against the copy stored before it)."""
        windows = [float(window_s)] * len(keys) if isinstance(window_s, (int, float)) else list(window_s)
        first: dict[tuple[str, bytes], int] = {}
        claimed = 0
        for i, k in enumerate(keys):
            if windows[i] > 0:
                first.setdefault(k, i)
                claimed += 1
        if not first:
            return [True] * len(keys)        # every window is 0: nothing can be a duplicate
        if claimed == len(first):            # each key once (the usual batch): one statement
            old = self._claim_round(list(first.values()), keys, received_at, windows)
            return [windows[i] <= 0 or (first[k] == i and i not in old) for i, k in enumerate(keys)]
        copies: dict[tuple[str, bytes], list[int]] = {}
        for i, k in enumerate(keys):
            if windows[i] > 0:
                copies.setdefault(k, []).append(i)
        for at in copies.values():
            at.sort(key=lambda i: (received_at[i], i))
        new = [windows[i] <= 0 for i in range(len(keys))]
        for r in range(max(len(at) for at in copies.values())):
            round_ = [at[r] for at in copies.values() if len(at) > r]
            if r:
                self._conn.execute("DELETE FROM iotjx_claim")
            old = self._claim_round(round_, keys, received_at, windows)
            for i in round_:
                new[i] = i not in old
        return new

    def _claim_round(self, at: list[int], keys: Sequence[tuple[str, bytes]], received_at: Sequence[float],
                     windows: list[float]) -> set[int]:
        """Claim the keys at positions `at` (one copy of each key); the positions that were not new."""
        n = len(at)
        with self._conn.cursor() as cur:
            with cur.copy(f"COPY iotjx_claim ({', '.join(CLAIM_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(pgbinary.encode([
                    Column("integer", np.asarray(at, dtype=np.int64)),
                    Column("text", [keys[i][0] for i in at]),
                    Column("bytea", [keys[i][1] for i in at]),
                    Column("timestamp with time zone", np.asarray([received_at[i] for i in at], dtype=np.float64)),
                    Column("double precision", np.asarray([windows[i] for i in at], dtype=np.float64))], n))
            return {i for (i,) in cur.execute(_CLAIM).fetchall()}

    def tally_rejects(self, ws: WriteSet, rows_per_min: int) -> Counter[tuple[str, str, str]]:
        """`ingest.rejects.tally_rejects` in this transaction: the rejects past `rows_per_min` per
        source, reason and minute are counted, not written."""
        return tally_rejects(self._conn, ws, rows_per_min)

    def write(self, ws: WriteSet) -> None:
        self._writer._write_in(self._conn, ws)


_COLUMN_TYPES: dict[tuple[str, tuple[str, ...]], list[str]] = {}


def _column_types(cur: psycopg.Cursor, table: str, columns: Sequence[str]) -> list[str]:
    """The columns' types as the database has them (`format_type`), looked up once per process."""
    key = (table, tuple(columns))
    types = _COLUMN_TYPES.get(key)
    if types is None:
        found = dict(cur.execute("""SELECT attname, format_type(atttypid, NULL) FROM pg_attribute
                                    WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped""",
                                 (table,)).fetchall())
        types = _COLUMN_TYPES[key] = [found[c] for c in columns]
    return types


def _copy(cur: psycopg.Cursor, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
    """COPY in binary: psycopg's C dumpers write each value without text escaping."""
    types = _column_types(cur, table, columns)
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


def _copy_block(cur: psycopg.Cursor, table: str, columns: Sequence[str], values: list[Column], rows: int) -> None:
    """COPY a columnar block: the binary stream built by `ingest.pgbinary` in one write."""
    types = _column_types(cur, table, columns)
    wrong = [f"{c} is {t}, the block has {v.pgtype}" for c, t, v in zip(columns, types, values, strict=True)
             if t != v.pgtype]
    if wrong:       # the schema and the writer disagree: a migration the code does not know
        raise TypeError(f"{table}: " + "; ".join(wrong))
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(pgbinary.encode(values, rows))
