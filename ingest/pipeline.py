"""Uplink → bounded queue → batch (by size or age) → dedup → decode → COPY → commit → ack, with a
durable on-disk spool for when the database is away or slow.

Two threads.  The intake thread (``iotjx-writer``) collects batches from the queue and numbers them;
while the database keeps up it hands each batch to the database thread (``iotjx-db``), which
commits it and acknowledges every uplink.  When a commit fails (OperationalError) or a batch has
waited on the database longer than `slow_batch_s`, the pipeline switches to *spooling*: batches go
to the journal (`ingest.spool`), fsync'd, then acknowledged with the `spooled` outcome, and the
database thread replays the journal, oldest first, in transactions of about `batch_size` uplinks.
When the journal is empty again, batches go straight to the database.  A journal left by a previous
run puts the pipeline in spooling mode at start-up, so it is replayed before anything newer.

Nothing is acknowledged before it is committed or fsync'd.  Memory is bounded: `queue_max` uplinks
and `queue_max_bytes` of payload in the queue (plus one put), and one batch taken from it in each
thread; an uplink over `uplink_max_bytes` is cut to its first KiB before it is queued and rejected
as `too_large` (`ingest.rejects`).  When the journal reaches its byte limit the intake
thread stops taking batches, the queue fills and `submit` blocks — transports stop reading and
stop acknowledging (MQTT: the broker keeps the messages; CoAP/HTTP: devices retry) — and the
pipeline says so in the log, once per change of state, and in its counters."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from iotjx.model import Uplink

from .metrics import UNKNOWN_CODEC, IngestMetrics
from .registry import DeviceRegistry
from .rejects import SuppressionLog, cut, cut_mark, digest
from .spool import Spool, SpoolFull
from .uplink_queue import Closed, UplinkQueue
from .batch import BatchBuilder, claim_key
from .writer import SPOOLED, WriteSet, Writer

log = logging.getLogger(__name__)

SLOW_BATCH_S = 10.0    # a batch waiting this long on the database sends the batches behind it to the spool


class Pipeline:
    """The batching writer.  Transports call `submit`, which blocks while the queue is full: that is
    the flow control that keeps memory bounded (the broker keeps what we have not read)."""

    def __init__(self, registry: DeviceRegistry, writer: Writer, *, batch_size: int = 5000,
                 batch_age_s: float = 0.2, batch_idle_s: float = 0.0, queue_max: int = 50_000, retry_max_s: float = 5.0,
                 dedup_window_s: float = 86400.0, spool: Spool | None = None,
                 slow_batch_s: float = SLOW_BATCH_S, metrics: IngestMetrics | None = None,
                 more_writers: Sequence[Writer] = (), queue_max_bytes: int | None = None,
                 uplink_max_bytes: int | None = None, reject_rows_per_min: int | None = None) -> None:
        """`more_writers`: further connections, each with a database thread of its own, so that one
        batch is built while another waits on PostgreSQL (the spool is replayed by the first).
        `batch_idle_s` > 0: a batch is also written once no uplink arrived for that long while no
        other batch is being written (group commit for devices that wait for their answer).
        `queue_max_bytes`: the queue's bound in payload bytes besides `queue_max` uplinks;
        `uplink_max_bytes`: larger uplinks are queued cut, as too_large rejects;
        `reject_rows_per_min`: reject rows kept per source, reason and minute, the rest counted
        (None: every reject is a row).  None: no such bound."""
        self._dedup_window_s = dedup_window_s
        self._last_purge = 0.0
        self._builder = BatchBuilder(registry)
        self._writer = writer
        self._writers = [writer, *more_writers]
        self._local = threading.local()       # which writer the current database thread owns
        self._stats_lock = threading.Lock()
        self._batch_size = batch_size
        self._batch_age_s = batch_age_s
        self._batch_idle_s = batch_idle_s
        self._retry_max_s = retry_max_s
        self._slow_batch_s = slow_batch_s
        self._spool = spool
        self._queue: UplinkQueue[Uplink] = UplinkQueue(queue_max, queue_max_bytes, _payload_bytes)
        self._weigh = queue_max_bytes is not None or uplink_max_bytes is not None
        self._uplink_max = uplink_max_bytes if uplink_max_bytes is not None else float("inf")
        self._reject_rows_per_min = reject_rows_per_min
        self._suppression_log = SuppressionLog(reject_rows_per_min or 0)
        self._intake: threading.Thread | None = None
        self._db: list[threading.Thread] = []
        self._stopping = threading.Event()
        # Shared between the two threads, under `_cond`:
        self._cond = threading.Condition()
        self._handoff: tuple[int, list[Uplink]] | None = None   # a batch for a database thread
        self._busy: dict[int, float] = {}                        # database thread -> when its batch started
        self._intake_done = False
        self._spooling = spool is not None and not spool.empty   # a journal from a previous run: replay it first
        self._full = False                                       # backpressure: the journal is at its limit
        self._retry_at = 0.0
        self._retry_delay = 0.1
        self._seq = spool.last_seq() if spool is not None else 0
        self.metrics = metrics or IngestMetrics()
        self.counters: Counter[str] = Counter()
        self.last_error: str | None = None
        self.batches = 0
        self._ack_flushes: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ transport side
    def submit(self, uplink: Uplink) -> None:
        """Queue one uplink; blocks while the queue is full.  Its `ack` is called exactly once, after
        it is committed (stored / duplicate / rejected) or fsync'd in the spool (spooled)."""
        if not self._weigh:
            self._queue.put(uplink)
        else:
            size = len(uplink.payload)
            if size > self._uplink_max:
                uplink = self._cut(uplink)
                size = len(uplink.payload)
            self._queue.put_many((uplink,), weights=(size,))
        self.counters[f"received.{uplink.transport}"] += 1

    def try_submit(self, uplink: Uplink) -> bool:
        """`submit` without waiting: False (nothing queued, `ack` never called) while the queue is
        full or the pipeline is stopping.  For a transport answering on an event loop."""
        size = len(uplink.payload)
        if size > self._uplink_max:
            uplink = self._cut(uplink)
            size = len(uplink.payload)
        try:
            self._queue.put_many((uplink,), timeout=0, weights=(size,) if self._weigh else None)
        except (TimeoutError, Closed):
            return False
        self.counters[f"received.{uplink.transport}"] += 1
        return True

    def submit_many(self, uplinks: list[Uplink], transport: str) -> None:
        """`submit` for a group of uplinks of one transport (one queue operation for all of them)."""
        if not uplinks:
            return
        if not self._weigh:
            self._queue.put_many(uplinks)
        else:
            sizes = [len(u.payload) for u in uplinks]
            if max(sizes) > self._uplink_max:
                uplinks = [self._cut(u) if n > self._uplink_max else u for u, n in zip(uplinks, sizes, strict=True)]
                sizes = [len(u.payload) for u in uplinks]
            self._queue.put_many(uplinks, weights=sizes)
        self.counters[f"received.{transport}"] += len(uplinks)

    def _cut(self, uplink: Uplink) -> Uplink:
        """An uplink over IOTJX_UPLINK_MAX_BYTES as it is queued: its first KiB, to be rejected."""
        self.counters[f"too_large.{uplink.transport}"] += 1
        return cut(uplink, int(self._uplink_max))

    def wait_room(self, timeout: float) -> bool:
        """True when `submit` would not block now; waits up to `timeout` for room.  A transport
        whose own thread must keep writing (MQTT: PUBACKs, keep-alive) checks this instead of
        blocking inside `submit`."""
        return self._queue.wait_room(timeout)

    def add_ack_flush(self, flush: Callable[[], None]) -> None:
        """Call `flush` after each group of acks (a committed batch, a spooled batch), in the thread
        that acked: a transport may then buffer its acks and send them at once (one PUBACK write, one
        event-loop wake-up per batch instead of one per uplink)."""
        self._ack_flushes.append(flush)

    def _flush_acks(self) -> None:
        for flush in self._ack_flushes:
            try:
                flush()
            except Exception:  # a transport that cannot ack must not stop the writer
                log.exception("flushing acks failed")

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def queue_bytes(self) -> int:
        """Payload bytes waiting in the queue (0 when it is not bounded in bytes)."""
        return self._queue.qbytes()

    def spool_status(self) -> dict[str, Any]:
        """The journal as /health and the metrics show it (JSON-able)."""
        with self._cond:
            mode = "spooling" if self._spooling else "direct"
            full = self._full
            busy = time.monotonic() - min(self._busy.values()) if self._busy else 0.0
        out: dict[str, Any] = {"enabled": self._spool is not None, "mode": mode, "full": full,
                               "db_batch_busy_s": round(busy, 3)}
        if self._spool is not None:
            s = self._spool.status()
            out.update(directory=s.directory, segments=s.segments, uplinks=s.uplinks, bytes=s.bytes,
                       limit_bytes=s.limit_bytes, oldest_received_at=s.oldest_received_at,
                       age_s=round(s.age_s(), 3))
        return out

    def metrics_snapshot(self) -> dict[str, Any]:
        """Counters, batch latency, queue depth and the spool, JSON-able (see `ingest.metrics`)."""
        return {**self.metrics.snapshot(), "queue_depth": self.queue_depth, "queue_bytes": self.queue_bytes,
                "spool": self.spool_status()}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._spooling:
            log.warning("replaying the spool left by a previous run before anything newer")
        self._db = [threading.Thread(target=self._run_db, args=(k,), name=f"iotjx-db{k or ''}", daemon=True)
                    for k in range(len(self._writers))]
        self._intake = threading.Thread(target=self._run_intake, name="iotjx-writer", daemon=True)
        for thread in self._db:
            thread.start()
        self._intake.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write (or spool) what is queued, then stop both threads and release the spool (the pipeline
        owns the spool it is given).  What remains spooled is replayed at the next start."""
        if self._intake is None:
            return
        self._stopping.set()
        self._queue.close()
        deadline = time.monotonic() + timeout
        for thread in (self._intake, *self._db):
            thread.join(max(0.1, deadline - time.monotonic()))
            if thread.is_alive():
                log.error("%s did not finish within %.0f s; %d uplinks unacknowledged",
                          thread.name, timeout, self.queue_depth)
        if self._spool is not None:
            if not self._spool.empty:
                s = self._spool.status()
                log.warning("stopping with %d uplinks in the spool %s; they are replayed at the next start",
                            s.uplinks, s.directory)
            self._spool.close()
        self._intake, self._db = None, []

    # ------------------------------------------------------------------ intake thread
    def _run_intake(self) -> None:
        done = False
        while not done:
            batch, done = self._collect()
            if batch:
                self.metrics.count("received", Counter(u.transport for u in batch))
                self._seq += 1
                self._dispatch(self._seq, batch)
        with self._cond:
            self._intake_done = True
            self._cond.notify_all()

    def _collect(self) -> tuple[list[Uplink], bool]:
        return self._queue.take(self._batch_size, self._batch_age_s, self._batch_idle_s, self._writers_idle)

    def _writers_idle(self) -> bool:
        """No batch is being written or waiting for a writer (read without the lock: a hint)."""
        return not self._busy and self._handoff is None

    def _dispatch(self, seq: int, batch: list[Uplink]) -> None:
        """Hand the batch to the database thread, or spool it; waits (backpressure) when neither can."""
        with self._cond:
            while True:
                if not self._spooling:
                    if self._handoff is None and len(self._busy) < len(self._writers):
                        self._handoff = (seq, batch)
                        self._cond.notify_all()
                        return
                    waited = time.monotonic() - min(self._busy.values()) if self._busy else 0.0
                    if self._spool is None or waited < self._slow_batch_s:
                        self._cond.wait(max(0.01, self._slow_batch_s - waited) if self._spool else None)
                        continue
                    self._enter_spooling(f"a batch has waited {waited:.1f} s for the database")
                if self._spool_locked(seq, batch):
                    break
                self._cond.wait(1.0)          # full: the replay frees room, or the journal drains
        self._ack_spooled(batch)

    # ------------------------------------------------------------------ database thread
    def _run_db(self, k: int) -> None:
        self._local.writer = self._writers[k]
        replays = k == 0                      # one thread replays the spool, in order
        while True:
            with self._cond:
                while True:
                    if self._handoff is not None:
                        (seq, batch), self._handoff = self._handoff, None
                        self._busy[k] = time.monotonic()
                        break
                    if self._intake_done:
                        return
                    if replays and self._spooling and time.monotonic() >= self._retry_at:
                        seq, batch = 0, []
                        break
                    self._cond.wait(max(0.01, self._retry_at - time.monotonic())
                                    if replays and self._spooling else None)
            if batch:
                try:
                    self._direct(seq, batch)
                finally:
                    with self._cond:
                        self._busy.pop(k, None)
                        self._cond.notify_all()
            else:
                self._replay()

    @property
    def _w(self) -> Writer:
        """The writer (connection) of the calling database thread; the first one elsewhere."""
        return getattr(self._local, "writer", self._writer)

    def _direct(self, seq: int, batch: list[Uplink]) -> None:
        done: set[int] = set()
        rest = batch
        # One immediate retry when the database was healthy: a connection the server closed while
        # idle reconnects fine.
        for _ in range(2 if self.last_error is None else 1):
            try:
                self._store(rest, done)
                self._db_ok()
                return
            except psycopg.OperationalError as exc:
                self._db_failed(exc, len(rest))
            rest = [u for u in rest if id(u) not in done]
        self._keep(seq, rest)

    def _keep(self, seq: int, batch: list[Uplink]) -> None:
        """The database did not take `batch`: spool it (its number sorts it before the batches that
        arrived behind it), or — without a spool, or with a full one — hold it and retry."""
        delay = 0.1
        while True:
            if self._spool is not None:
                with self._cond:
                    spooled = self._spool_locked(seq, batch)
                    if spooled:
                        self._enter_spooling(self.last_error or "the database refused the batch")
                if spooled:
                    self._ack_spooled(batch)
                    return
            time.sleep(delay)        # even when stopping: the batch is ours until something durable has it
            delay = min(delay * 2, self._retry_max_s)
            done: set[int] = set()
            try:
                self._store(batch, done)
                self._db_ok()
                return
            except psycopg.OperationalError as exc:
                self._db_failed(exc, len(batch))
                batch = [u for u in batch if id(u) not in done]

    def _replay(self) -> None:
        """Replay the oldest spooled batches (about `batch_size` uplinks) in one transaction."""
        assert self._spool is not None
        take, uplinks = [], []
        for segment in self._spool.segments():
            if take and len(uplinks) + segment.uplinks > self._batch_size:
                break
            take.append(segment)
            uplinks.extend(self._spool.read(segment).uplinks)
        try:
            if uplinks:
                self._store(uplinks, set())
        except psycopg.OperationalError as exc:
            # Part of it may have committed: replaying that part again finds its dedup keys claimed.
            self._db_failed(exc, len(uplinks))
            with self._cond:
                self._retry_at = time.monotonic() + self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, self._retry_max_s)
            return
        self._db_ok()
        # A crash here, after the commit and before the segments are gone, replays them again at the
        # next start: their dedup keys are claimed, so they are counted as duplicates, not stored twice.
        self._spool.remove(take)
        self.counters["replayed"] += len(uplinks)
        self.metrics.count("replayed", Counter(u.transport for u in uplinks))
        with self._cond:
            self._retry_delay = 0.1
            if self._spool.empty:      # appends happen under this lock: nothing can slip in behind
                self._spooling = False
                log.warning("spool drained: the database takes batches directly again")
            self._cond.notify_all()    # room in the journal for an intake thread held back by a full one

    # ------------------------------------------------------------------ spooling (with _cond held)
    def _spool_locked(self, seq: int, batch: list[Uplink]) -> bool:
        assert self._spool is not None
        try:
            self._spool.append(seq, batch)
        except SpoolFull as exc:
            self._set_full(True, str(exc))
            return False
        except OSError as exc:
            self.counters["spool_errors"] += 1
            self._set_full(True, f"the spool cannot be written: {exc}")
            return False
        self._set_full(False, "")
        self.counters["spooled"] += len(batch)
        self.metrics.count("spooled", Counter(u.transport for u in batch))
        return True

    def _enter_spooling(self, why: str) -> None:
        if not self._spooling:
            self._spooling = True
            self._retry_at = time.monotonic() + self._retry_delay
            self.counters["spool_episodes"] += 1
            log.error("database unavailable or slow (%s): spooling uplinks to %s until it recovers",
                      why, self._spool.directory if self._spool else "?")

    def _set_full(self, full: bool, why: str) -> None:
        if full == self._full:
            return
        self._full = full
        if full:
            self.counters["spool_full"] += 1
            log.error("BACKPRESSURE: %s — uplinks are no longer acknowledged; transports are held back "
                      "until the database drains the spool", why)
        else:
            log.error("backpressure over: the spool has room again; acknowledging uplinks")

    def _ack_spooled(self, batch: list[Uplink]) -> None:
        for u in batch:
            try:
                u.ack(SPOOLED)
            except Exception:  # a transport that cannot ack must not stop the writer
                log.exception("ack failed for a spooled uplink from %s", u.device_id)
        self._flush_acks()

    def _db_failed(self, exc: Exception, n: int) -> None:
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.counters["db_retries"] += 1
        # Once per change: a replay retried every few seconds through an outage says nothing new.
        log.log(logging.WARNING if error != self.last_error else logging.DEBUG,
                "database unavailable for a batch of %d: %s", n, error)
        self.last_error = error

    def _db_ok(self) -> None:
        if self.last_error is not None:
            log.warning("the database answers again (after: %s)", self.last_error)
            self.last_error = None

    # ------------------------------------------------------------------ the work
    def process(self, batch: Sequence[Uplink]) -> WriteSet:
        """Deduplicate, decode, store and acknowledge one batch, in one transaction (raises
        psycopg.OperationalError, acknowledging nothing, when the database is away)."""
        return self._store(list(batch), set())

    def _store(self, batch: list[Uplink], done: set[int]) -> WriteSet:
        """Commit and acknowledge `batch`; ids of what committed are added to `done` as it goes (a
        batch the database refuses is bisected, so part of it may commit before a connection fails)."""
        started = time.perf_counter()
        try:
            ws = self._commit(batch)
        except psycopg.OperationalError:
            raise
        except Exception as exc:
            if len(batch) > 1:
                half = len(batch) // 2
                first = self._store(batch[:half], done)
                self._store(batch[half:], done)
                return first
            # This one uplink cannot be stored as decoded: keep its bytes with the reason.
            reason = "storage" if isinstance(exc, psycopg.Error) else "internal"
            if reason == "internal":
                log.exception("uplink from %s could not be processed", batch[0].device_id)
            ws = WriteSet()
            ws.add_reject(batch[0], None, reason, (str(exc).splitlines() or [type(exc).__name__])[0])
            self._w.write(ws)
        done.update(id(u) for u in batch)
        self._after_commit(batch, ws, time.perf_counter() - started)
        return ws

    def _commit(self, batch: list[Uplink]) -> WriteSet:
        with self._w.transaction() as tx:
            fresh = batch
            ws = WriteSet()
            devices = self._builder.devices(batch)
            if self._dedup_window_s > 0:
                is_new = tx.claim(_dedup_keys(batch), [u.received_at for u in batch],
                                  self._builder.dedup_windows(batch, self._dedup_window_s, devices))
                fresh = [u for u, new in zip(batch, is_new, strict=True) if new]
                if len(fresh) < len(batch):
                    dups = [u for u, new in zip(batch, is_new, strict=True) if not new]
                    for u, codec in zip(dups, self._builder.codecs(dups, devices), strict=True):
                        ws.add_duplicate(u, codec)
            self._builder.build(fresh, ws, devices)
            if ws.rejects and self._reject_rows_per_min is not None:
                tx.tally_rejects(ws, self._reject_rows_per_min)
            tx.write(ws)
        return ws

    def _after_commit(self, batch: list[Uplink], ws: WriteSet, seconds: float) -> None:
        outcomes: Counter[tuple[str, str, str]] = Counter()
        reasons: Counter[str] = Counter()
        for u in batch:
            outcome = ws.outcome(u)
            try:
                u.ack(outcome)
            except Exception:  # a transport that cannot ack must not stop the writer
                log.exception("ack failed for an uplink from %s", u.device_id)
            outcomes[(outcome.status, u.transport, ws.codec(u) or UNKNOWN_CODEC)] += 1
            if outcome.status == "rejected":
                reasons[outcome.reason or "unknown"] += 1
        self._flush_acks()
        suppressed: Counter[tuple[str, str]] = Counter()
        for (transport, _, reason), n in ws.suppressed.items():
            suppressed[(transport, reason)] += n
        if suppressed:
            self._suppression_log.note(ws.suppressed)
        with self._stats_lock:         # the database threads count into the same figures
            self.metrics.outcomes(outcomes, reasons, suppressed)
            self.counters["rejects_suppressed"] += sum(suppressed.values())
            self.metrics.batch(seconds, len(batch))
            self.batches += 1
            self.counters["stored"] += ws.stored
            self.counters["rejected"] += len(ws.rejects)
            self.counters["duplicate"] += ws.duplicates
            purge = self._dedup_window_s > 0 and time.monotonic() - self._last_purge > 600
            if purge:
                self._last_purge = time.monotonic()
        if purge:
            try:
                self._w.purge_dedup(self._dedup_window_s)
            except psycopg.Error as exc:    # the batch is committed; purging can wait for the next one
                log.warning("dedup keys not purged: %s", str(exc).splitlines()[0])

    def build(self, batch: Sequence[Uplink], ws: WriteSet | None = None) -> WriteSet:
        """The rows a batch turns into; pure apart from the registry lookup."""
        return self._builder.build(batch, ws)


def _dedup_keys(batch: list[Uplink]) -> list[tuple[str, bytes]]:
    """(device, key) per uplink (`batch.claim_key`: a carrier push's by the message it carries); an
    uplink cut at IOTJX_UPLINK_MAX_BYTES keeps the key of all its bytes (its redelivery is a
    duplicate; another payload with the same first KiB is not)."""
    keys = [claim_key(u, digest) for u in batch]      # a device's uplinks are the same when their bytes are
    if any(cut_mark(u) for u in batch if u.meta):
        for i, u in enumerate(batch):
            mark = cut_mark(u)
            if mark:
                keys[i] = (u.device_id, bytes.fromhex(mark["blake2b"]))
    return keys


def _payload_bytes(uplink: Uplink) -> int:
    return len(uplink.payload)
