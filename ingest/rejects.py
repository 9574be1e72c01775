"""What the gateway does with rejects beyond keeping them: bounds that junk cannot pass.

- *Too large.*  An uplink over its model's `max_payload_bytes` (decoders/models/*.toml), or over the
  transport-wide IOTJX_UPLINK_MAX_BYTES before it is even queued (`cut`), is a reject with reason
  `too_large` that keeps its first `KEPT_BYTES`, its size and its BLAKE2b-128 digest (the dedup key
  of the whole payload, so a redelivery is still a duplicate) — never the whole payload, neither in
  rejected_uplinks nor in raw_uplinks.
- *Counted, not written, past a rate.*  Every reject is counted in reject_tally per (minute
  received, transport, source, reason); only the first IOTJX_REJECT_ROWS_PER_MIN of each such key
  are written as rows (`tally_rejects`, in the batch's transaction: exactly once, like the rest).
  A flood of unknown ids from one source costs a counter update, not a row and a raw-log row each.
- *Retention.*  rejected_uplinks and reject_tally keep IOTJX_REJECT_RETENTION_DAYS; `purge_rejects`
  deletes older rows in bounded chunks, one transaction each, under an advisory lock (two replicas
  never purge at once), and `RejectRetention` runs it on a schedule in the gateway.

rejected_uplinks stays a plain table on PostgreSQL and TimescaleDB alike (not partitioned like
raw_uplinks): its `reject_id` is a primary key on its own, so one reject can be found by id (a later
"decode this reject again" API) without naming its day, and with rows rate-limited per source the
daily volume is small enough for chunked deletes (docs/ingest.md, "Rejects")."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg

from iotjx.model import Uplink

if TYPE_CHECKING:
    from .writer import WriteSet

log = logging.getLogger(__name__)

# The gateway's own reject reasons, beside the decoders' (decoders.REASONS): stored in the rejects
# table, the raw log and reject_tally, so append only.
UNKNOWN_DEVICE = "unknown_device"    # no registered, active device with this id
TOO_LARGE = "too_large"              # over its model's max_payload_bytes or IOTJX_UPLINK_MAX_BYTES
GATEWAY_REASONS = (UNKNOWN_DEVICE, TOO_LARGE, "storage", "internal",
                   "bad_original_time")     # a tester's replay whose original time is not honoured (ingest.replay)
KEPT_BYTES = 1024                    # what a too_large reject keeps of its payload
PURGE_LOCK = 0x10_7A_5D              # advisory lock: one gateway purges at a time (migrations use 0x107A5C)


def digest(payload: bytes) -> bytes:
    """BLAKE2b-128 of a payload: what makes two uplinks of one device the same (a retransmission, a
    redelivery: the pipeline's dedup key), and a too_large reject's fingerprint."""
    return hashlib.blake2b(payload, digest_size=16).digest()


def too_large_detail(size: int, limit: int, fingerprint: bytes, what: str) -> str:
    """A too_large reject's detail: how big, over what limit, what was kept, how to recognise it."""
    return (f"{size:,} bytes, over {what} of {limit:,}; the first {min(size, KEPT_BYTES):,} kept, "
            f"BLAKE2b-128 of all of it {fingerprint.hex()}")


def cut(u: Uplink, limit: int) -> Uplink:
    """`u`, over the transport-wide `limit`, as it is queued: its first `KEPT_BYTES`, and in
    `meta["too_large"]` its size, the limit and its digest (the batch rejects it as too_large)."""
    size = len(u.payload)
    mark = {"bytes": size, "limit": limit, "blake2b": digest(u.payload).hex()}
    return replace(u, payload=u.payload[:KEPT_BYTES], meta={**u.meta, TOO_LARGE: mark})


def cut_mark(u: Uplink) -> dict[str, Any] | None:
    """What `cut` noted about an uplink (None: it was not cut)."""
    return u.meta.get(TOO_LARGE) if u.meta else None


def reject_source(u: Uplink) -> str:
    """Who sent an uplink, as the reject rate counts it: the MQTT user name where the broker passed
    one (`meta["username"]`), the peer's address without its port (`meta["peer"]`: CoAP, HTTP),
    else the transport."""
    meta = u.meta
    if not meta:
        return u.transport
    user = meta.get("username")
    if user:
        return str(user)
    peer = meta.get("peer")
    if not peer:
        return u.transport
    peer = str(peer)
    if peer.startswith("["):                       # [IPv6]:port
        end = peer.find("]")
        return peer[1:end] if end > 0 else peer
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else peer


# Each key's rejects are added to its tally row; the total it returns (this batch included) says how
# many the key had before.  Keys are upserted sorted: every writer locks tally rows in one order.
_TALLY = """
    INSERT INTO reject_tally AS t (minute, transport, source, reason, rejects, suppressed)
    SELECT to_timestamp(m), tr, src, rs, n, greatest(n - %s, 0)
    FROM unnest(%b::int8[], %b::text[], %b::text[], %b::text[], %b::int8[]) AS k(m, tr, src, rs, n)
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (minute, transport, source, reason) DO UPDATE SET
        rejects = t.rejects + excluded.rejects,
        suppressed = t.suppressed + least(excluded.rejects, greatest(t.rejects + excluded.rejects - %s, 0))
    RETURNING extract(epoch FROM minute)::int8, transport, source, reason, rejects"""


def tally_rejects(conn: psycopg.Connection, ws: WriteSet, rows_per_min: int) -> Counter[tuple[str, str, str]]:
    """Count the batch's rejects in reject_tally per (minute received, transport, source, reason)
    and keep as rows only the first `rows_per_min` of each key: the tally row is the counter, so
    the budget holds across batches, writers and gateways (a concurrent batch with the same key
    waits for this one's commit).  Marks the others in `ws.reject_kept`; returns (and keeps in
    `ws.suppressed`) their number per (transport, source, reason).  Runs in the caller's transaction."""
    if not ws.rejects:
        return Counter()
    minutes = (np.asarray(ws.reject_at, dtype=np.float64) // 60 * 60).astype(np.int64).tolist()
    keys = [(m, r[2], src, r[5]) for m, r, src in zip(minutes, ws.rejects, ws.reject_sources, strict=True)]
    counts = Counter(keys)
    m, tr, src, rs = (list(c) for c in zip(*counts, strict=True))
    rows = conn.execute(_TALLY, (rows_per_min, m, tr, src, rs, list(counts.values()), rows_per_min)).fetchall()
    left: dict[tuple[int, str, str, str], int] = {}
    for minute, transport, source, reason, total in rows:
        key = (int(minute), transport, source, reason)
        n = counts[key]
        left[key] = min(n, max(0, rows_per_min - (total - n)))       # rows this batch may still write
    kept: list[bool] = []
    suppressed: Counter[tuple[str, str, str]] = Counter()
    for key in keys:
        if left[key] > 0:
            left[key] -= 1
            kept.append(True)
        else:
            kept.append(False)
            suppressed[key[1:]] += 1
    ws.reject_kept = kept if suppressed else None
    ws.suppressed = suppressed
    return suppressed


class SuppressionLog:
    """Says once per source and `interval_s` that rejects from it are being counted, not written,
    with how many since it last said so (a flood logs a line a minute, not a line a reject)."""

    def __init__(self, rows_per_min: int, interval_s: float = 60.0, sources_max: int = 10_000) -> None:
        self._rows_per_min = rows_per_min
        self._interval_s = interval_s
        self._sources_max = sources_max
        self._lock = threading.Lock()
        self._said: dict[tuple[str, str], float] = {}         # (transport, source) -> when last said
        self._since: Counter[tuple[str, str, str]] = Counter()  # suppressed since then, by reason

    def note(self, suppressed: Counter[tuple[str, str, str]]) -> None:
        now = time.monotonic()
        lines = []
        with self._lock:
            self._since.update(suppressed)
            for transport, source in {k[:2] for k in suppressed}:
                if now - self._said.get((transport, source), -1e18) < self._interval_s:
                    continue
                if len(self._said) >= self._sources_max:
                    self._said.clear()                       # bounded under a flood of made-up sources
                self._said[(transport, source)] = now
                reasons = {k[2]: n for k, n in self._since.items() if k[:2] == (transport, source)}
                for reason in reasons:
                    del self._since[(transport, source, reason)]
                lines.append((transport, source, reasons))
        for transport, source, reasons in lines:
            log.warning("rejects from %s %s past %d rows per minute and reason: %s counted in reject_tally, "
                        "not written as rows", transport, source, self._rows_per_min,
                        ", ".join(f"{n:,} {reason}" for reason, n in sorted(reasons.items())))


# --------------------------------------------------------------------------------------- retention

_PURGE = {
    "rejected_uplinks": """
        WITH gone AS (
            DELETE FROM rejected_uplinks WHERE reject_id IN (
                SELECT reject_id FROM rejected_uplinks WHERE received_at < %s ORDER BY received_at LIMIT %s)
            RETURNING 1)
        SELECT count(*) FROM gone""",
    "reject_tally": """
        WITH gone AS (
            DELETE FROM reject_tally WHERE (minute, transport, source, reason) IN (
                SELECT minute, transport, source, reason FROM reject_tally WHERE minute < %s ORDER BY minute LIMIT %s)
            RETURNING 1)
        SELECT count(*) FROM gone"""}


@dataclass(frozen=True, slots=True)
class Purged:
    """What one `purge_rejects` run deleted, per table, and whether nothing past the window is left."""

    rows: dict[str, int]
    done: bool


def purge_rejects(conn: psycopg.Connection, retention_days: float, *, chunk: int = 5000, budget_s: float = 30.0,
                  pause_s: float = 0.05, stop: threading.Event | None = None) -> Purged | None:
    """Delete rejects and tally rows received more than `retention_days` ago, `chunk` rows per
    transaction (short locks, bounded WAL per commit, a pause between chunks for the writers), for
    up to `budget_s` or until `stop` is set.  None when another gateway holds the purge lock: it is
    purging.  `conn` is in autocommit mode."""
    if not conn.execute("SELECT pg_try_advisory_lock(%s)", (PURGE_LOCK,)).fetchone()[0]:
        return None
    try:
        cutoff = conn.execute("SELECT now() - make_interval(secs => %s)", (retention_days * 86400.0,)).fetchone()[0]
        stop_at = time.monotonic() + budget_s
        rows = dict.fromkeys(_PURGE, 0)
        done = True
        for table, sql in _PURGE.items():
            while True:
                with conn.transaction():
                    n = conn.execute(sql, (cutoff, chunk)).fetchone()[0]
                rows[table] += n
                if n < chunk:
                    break
                if time.monotonic() >= stop_at or (stop is not None and stop.is_set()):
                    done = False
                    break
                time.sleep(pause_s)
            if not done:
                break
        return Purged(rows, done)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (PURGE_LOCK,))


class RejectRetention:
    """`purge_rejects` every `interval_s` in a thread of its own (first run `first_after_s` after
    `start`; again at once while a run leaves a backlog).  The database being away only delays it."""

    def __init__(self, connect: Callable[[], psycopg.Connection], retention_days: float, *,
                 interval_s: float = 3600.0, first_after_s: float = 60.0, chunk: int = 5000) -> None:
        self._connect = connect
        self._retention_days = retention_days
        self._interval_s = interval_s
        self._first_after_s = first_after_s
        self._chunk = chunk
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None
        self._failing = False
        self.runs = 0
        self.deleted = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="iotjx-reject-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None

    def run_once(self) -> Purged | None:
        """One purge now (None: another gateway is purging); raises psycopg.Error."""
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
            self._conn.autocommit = True
        purged = purge_rejects(self._conn, self._retention_days, chunk=self._chunk,
                               budget_s=min(30.0, self._interval_s / 2), stop=self._stop)
        self.runs += 1
        if purged is not None:
            self.deleted += sum(purged.rows.values())
            if purged.rows["rejected_uplinks"]:
                log.info("reject retention: deleted %s", purged.rows)
        return purged

    def _run(self) -> None:
        wait = self._first_after_s
        try:
            while not self._stop.wait(wait):
                wait = self._interval_s
                try:
                    purged = self.run_once()
                    if purged is not None and not purged.done:
                        wait = 1.0                           # a backlog: the next chunks soon
                    self._failing = False
                except psycopg.Error as exc:
                    if not self._failing:                    # once per outage, not once per try
                        log.warning("reject retention postponed: %s", str(exc).splitlines()[0] if str(exc) else exc)
                    self._failing = True
                    self._close()
        finally:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
