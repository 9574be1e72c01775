"""The one writer: what a batch writes (`WriteSet`, built from uplinks by `BatchBuilder`) goes to
the database with COPY, in one transaction (`Writer`, `Transaction`)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

import decoders
from decoders import DecodeError
from decoders.carrier import unwrap
from iotjx.db.migrations import ensure_partitions
from iotjx.model import Device, Outcome, Uplink

from .registry import DeviceRegistry
from .sinks import RADIO, WATER, radio_row, rows_for, water_fast_mask, water_rows_from_batch

log = logging.getLogger(__name__)

STORED = Outcome("stored")
DUPLICATE = Outcome("duplicate")
# Written to the gateway's on-disk journal, fsync'd: durable, acknowledged, stored when the database
# takes it.  Transports answer it as a success (MQTT PUBACK, CoAP 2.04, HTTP 202).
SPOOLED = Outcome("spooled", None, "kept in the gateway's journal until the database takes it")
RAW_COLUMNS = ("received_at", "device_id", "transport", "payload", "meta", "outcome")
REJECT_COLUMNS = ("received_at", "device_id", "transport", "codec", "payload", "reason", "detail", "meta")
ENVELOPES = ("ctwing", "onenet")
FIELDS = "fields"      # pseudo-codec: an object-model push whose platform already decoded the fields


@dataclass(slots=True)
class WriteSet:
    """Everything one batch adds: readings per table, rejects, the raw log, and device liveness."""

    readings: dict[str, tuple[tuple[str, ...], list[tuple]]] = field(default_factory=dict)
    rejects: list[tuple] = field(default_factory=list)
    raw: list[tuple] = field(default_factory=list)
    seen: dict[str, tuple[float, float, int]] = field(default_factory=dict)   # device -> (first, last, count)
    days: set[date] = field(default_factory=set)
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

    def add_reject(self, u: Uplink, codec: str | None, reason: str, detail: str) -> None:
        self.rejects.append((datetime.fromtimestamp(u.received_at, UTC), u.device_id, u.transport, codec,
                             u.payload, reason, detail, Jsonb(u.meta) if u.meta else None))
        self.add_raw(u, f"rejected:{reason}")
        self._set(u, Outcome("rejected", reason, detail), codec)

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
        if codec:
            self.codecs[self.origin.get(id(u), id(u))] = codec
        first, last, count = self.seen.get(u.device_id, (u.received_at, u.received_at, 0))
        self.seen[u.device_id] = (min(first, u.received_at), max(last, u.received_at), count + 1)


_SEEN_UPSERT = """
    INSERT INTO device_state AS s (device_id, first_seen, last_seen, uplinks)
    SELECT device_id, to_timestamp(first_s), to_timestamp(last_s), n
    FROM unnest(%s::text[], %s::float8[], %s::float8[], %s::int8[]) AS t(device_id, first_s, last_s, n)
    ON CONFLICT (device_id) DO UPDATE SET
        first_seen = least(s.first_seen, excluded.first_seen),
        last_seen = greatest(s.last_seen, excluded.last_seen),
        uplinks = s.uplinks + excluded.uplinks"""


class Writer:
    """Owns one connection; `write` commits a WriteSet or raises, leaving nothing half-written."""

    def __init__(self, connect: Callable[[], psycopg.Connection]) -> None:
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self._partition_days: set[date] = set()

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
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
        """Forget dedup keys older than the window (they can no longer make a duplicate)."""
        with self.conn.transaction():
            cur = self.conn.execute("DELETE FROM uplink_dedup WHERE received_at < now() - make_interval(secs => %s)",
                                    (window_s,))
            return cur.rowcount

    def _write_in(self, conn: psycopg.Connection, ws: WriteSet) -> None:
        self._ensure_days(conn, ws.days)
        with conn.cursor() as cur:
            for table, (columns, rows) in ws.readings.items():
                if rows:
                    _copy(cur, table, columns, rows)
            if ws.rejects:
                _copy(cur, "rejected_uplinks", REJECT_COLUMNS, ws.rejects)
            if ws.raw:
                _copy(cur, "raw_uplinks", RAW_COLUMNS, ws.raw)
            if ws.seen:
                ids = sorted(ws.seen)       # one lock order for every gateway: no deadlock between replicas
                cur.execute(_SEEN_UPSERT, (ids, [ws.seen[d][0] for d in ids],
                                           [ws.seen[d][1] for d in ids], [ws.seen[d][2] for d in ids]))

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


_CLAIM = """
    INSERT INTO uplink_dedup AS d (device_id, key, received_at)
    SELECT * FROM unnest(%s::text[], %s::bytea[], %s::timestamptz[])
    ON CONFLICT (device_id, key) DO UPDATE SET received_at = excluded.received_at
        WHERE d.received_at < excluded.received_at - make_interval(secs => %s)
    RETURNING device_id, key"""


class Transaction:
    """The batch's transaction: `claim` decides which uplinks are new, `write` adds the rows."""

    def __init__(self, writer: Writer, conn: psycopg.Connection) -> None:
        self._writer = writer
        self._conn = conn

    def claim(self, keys: Sequence[tuple[str, bytes]], received_at: Sequence[float], window_s: float) -> list[bool]:
        """For each (device, key): True when no uplink with that key was stored within the window.
        Atomic across gateways: a concurrent claim of the same key waits for this transaction."""
        first: dict[tuple[str, bytes], int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        unique = sorted(first)        # one lock order for every gateway: no deadlock between replicas
        if not unique:
            return []
        new = set(self._conn.execute(_CLAIM, (
            [k[0] for k in unique], [k[1] for k in unique],
            [datetime.fromtimestamp(received_at[first[k]], UTC) for k in unique], window_s)).fetchall())
        return [first[k] == i and (k[0], k[1]) in new for i, k in enumerate(keys)]

    def write(self, ws: WriteSet) -> None:
        self._writer._write_in(self._conn, ws)


def _copy(cur: psycopg.Cursor, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


class BatchBuilder:
    """Turns a batch of uplinks into the rows it writes: opens carrier envelopes, asks the registry
    what each device is, decodes per codec (one batch-decoder call per group), maps records to the
    family tables.  Pure apart from the registry lookup."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self._registry = registry

    def codecs(self, batch: Sequence[Uplink]) -> list[str | None]:
        """The codec each uplink's device is registered with (for the duplicates' metrics label)."""
        devices = self._registry.lookup(u.device_id for u in batch if u.device_id)
        return [devices[u.device_id].codec if u.device_id in devices else u.meta.get("envelope") for u in batch]

    def build(self, batch: Sequence[Uplink], ws: WriteSet | None = None) -> WriteSet:
        """The rows a batch turns into; pure apart from the registry lookup."""
        ws = ws if ws is not None else WriteSet()
        batch = [self._open_pushed_envelope(ws, u) if u.meta.get("envelope") else u for u in batch]
        batch = [u for u in batch if u is not None]
        devices = self._registry.lookup(u.device_id for u in batch)
        groups: dict[tuple[str, str, str], list[Uplink]] = defaultdict(list)
        settings_of: dict[tuple[str, str, str], dict[str, Any]] = {}
        for u in batch:
            device = devices.get(u.device_id)
            if device is None:
                ws.add_reject(u, None, "unknown_device", "no registered, active device with this id")
                continue
            codec, settings = device.codec, device.codec_settings
            if codec in ENVELOPES:
                u = self._open_device_envelope(ws, u, device)
                if u is None:
                    continue
                codec, settings = device.inner_codec or "", device.inner_settings
            if "service_data" in u.meta:
                codec, settings = FIELDS, device.codec_settings
            key = (codec, device.family, _settings_key(settings))
            groups[key].append(u)
            settings_of[key] = settings
        for key, uplinks in groups.items():
            self._decode_group(ws, key[0], key[1], settings_of[key], uplinks)
        return ws

    def _open_pushed_envelope(self, ws: WriteSet, u: Uplink) -> Uplink | None:
        """A carrier push names its device inside the envelope: open it to know whose uplink it is."""
        codec = u.meta["envelope"]
        try:
            envelope, inner = unwrap(codec, u.payload)
        except DecodeError as exc:
            ws.add_reject(u, codec, exc.reason, exc.detail)
            return None
        device_id = envelope.get("imei") or envelope.get("device_id") or ""
        named = replace(u, device_id=device_id)
        ws.alias(named, u)
        return self._after_envelope(ws, named, codec, envelope, inner)

    def _open_device_envelope(self, ws: WriteSet, u: Uplink, device: Device) -> Uplink | None:
        if u.meta.get("envelope_opened"):
            return u
        try:
            envelope, inner = unwrap(device.codec, u.payload, device.codec_settings)
        except DecodeError as exc:
            ws.add_reject(u, device.codec, exc.reason, exc.detail)
            return None
        return self._after_envelope(ws, u, device.codec, envelope, inner)

    def _after_envelope(self, ws: WriteSet, u: Uplink, codec: str, envelope: dict[str, Any],
                        inner: bytes | None) -> Uplink | None:
        radio = {k: v for k, v in (envelope.get("radio") or {}).items() if v is not None}
        meta = {**u.meta, "envelope": codec, "envelope_opened": True, "sequence": envelope.get("sequence")}
        if radio:
            meta["radio"] = radio
        if inner is None and envelope.get("kind") in ("online", "offline"):
            event = replace(u, meta=meta)
            ws.alias(event, u)
            ws.add_event(event, f"event:{envelope['kind']}", radio_row(u, codec, radio), codec)
            return None
        if inner is None and not envelope.get("service_data"):
            ws.add_reject(u, codec, "schema", "the push carries neither a payload nor service data")
            return None
        if inner is None:
            meta["service_data"] = envelope["service_data"]    # an object-model push: fields, not bytes
        opened = replace(u, meta=meta, payload=inner if inner is not None else u.payload)
        ws.alias(opened, u)
        return opened

    def _decode_group(self, ws: WriteSet, codec: str, family: str, settings: dict[str, Any],
                      uplinks: list[Uplink]) -> None:
        if codec == FIELDS:
            name_map = settings.get("name_map") or {}
            for u in uplinks:
                fields = {name_map.get(k, k): v for k, v in u.meta["service_data"].items()}
                self._store_record(ws, u, codec, family, {"fields": fields})
            return
        if not codec:
            for u in uplinks:
                ws.add_reject(u, None, "unsupported", "an envelope model without an inner codec")
            return
        result = decoders.decode_batch(codec, [u.payload for u in uplinks], settings)
        ok = result.status == 0
        for i in np.flatnonzero(~ok):
            u = uplinks[i]
            ws.add_reject(u, codec, result.reason(i) or "unknown", _detail(codec, u.payload, settings))
        fast = water_fast_mask(result) if codec == "cjt188" else np.zeros(len(uplinks), dtype=bool)
        if fast.any():
            ws.add_rows(WATER.table, WATER.all_columns, water_rows_from_batch(result, uplinks, fast))
            for i in np.flatnonzero(fast):
                ws.add_stored(uplinks[i], codec)
        for i in np.flatnonzero(ok & ~fast):
            self._store_record(ws, uplinks[i], codec, family, result.record(i))

    def _store_record(self, ws: WriteSet, u: Uplink, codec: str, family: str, record: dict[str, Any]) -> None:
        try:
            table, rows = rows_for(codec, family, record)
        except ValueError as exc:
            ws.add_reject(u, codec, "unsupported", str(exc))
            return
        ws.add_rows(table.table, table.all_columns, [table.row(u, r) for r in rows])
        radio = u.meta.get("radio")
        if radio:
            row = radio_row(u, u.meta.get("envelope", "payload"), radio)
            if row is not None:
                ws.add_rows(RADIO.table, RADIO.all_columns, [row])
        ws.add_stored(u, codec)



def _settings_key(settings: dict[str, Any]) -> str:
    return repr(sorted(settings.items())) if settings else ""


def _detail(codec: str, payload: bytes, settings: dict[str, Any]) -> str:
    """The reference decoder's explanation of a reject (rejects are rare; this costs nothing at scale)."""
    try:
        decoders.decode(codec, payload, settings)
    except DecodeError as exc:
        return exc.detail
    except Exception as exc:  # the batch said no: keep whatever the reference says
        return f"{type(exc).__name__}: {exc}"
    return "the batch decoder refused what the reference decoder accepts"
