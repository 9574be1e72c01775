"""The durable spool: batches the database could not take (unreachable, or too slow) kept on local
disk, fsync'd before their transport is acknowledged, until the database takes them, in order.

On disk the journal is a directory of append-only segment files, one per spooled batch, named by the
batch's sequence number (``00000000000000000042.journal``), so that a sorted listing is arrival order
even when the batch the database was chewing on is spooled after the ones that arrived behind it.
A segment is written once — header, records, fsync of the file, fsync of the directory — and never
modified; replaying removes whole segments ("truncation") after their transaction committed.

Segment: ``MAGIC`` then records.  Record::

    >I length of body   >I CRC-32 of body   body
    body = >d received_at  >B len(transport)  >H len(device_id)  >I len(meta JSON)
           transport  device_id  meta JSON  payload (the rest)

A crash while a segment is written leaves a torn last record: its length runs past the end of the
file, or its CRC does not match.  Reading detects it, logs it and skips it (the batch was never
acknowledged, so its transport still holds it).  A CRC mismatch before the last record means the
disk damaged an acknowledged record: it is logged as an error and the segment file is kept beside
the journal as ``*.corrupt`` rather than deleted."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from iotjx.model import Uplink

log = logging.getLogger(__name__)

MAGIC = b"IOTJXJ1\n"
SUFFIX = ".journal"
RECORD_HEAD = struct.Struct(">II")
BODY_HEAD = struct.Struct(">dBHI")
MAX_RECORD = 64 * 1024 * 1024          # a length beyond this is damage, not an uplink
DEFAULT_MAX_BYTES = 1 << 30            # 1 GiB of journal, then backpressure


class SpoolFull(Exception):
    """The journal is at its byte limit: the batch was not written (and must not be acknowledged)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One spooled batch on disk."""

    seq: int
    path: Path
    size: int
    uplinks: int
    first_received_at: float | None


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    """What /health and the metrics show about the journal."""

    directory: str
    segments: int
    uplinks: int
    bytes: int
    limit_bytes: int
    oldest_received_at: float | None

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the oldest spooled uplink arrived (0 when the spool is empty)."""
        if self.oldest_received_at is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.oldest_received_at)


@dataclass(frozen=True, slots=True)
class ReadResult:
    """A segment's intact uplinks, and what was wrong with the rest."""

    uplinks: list[Uplink]
    torn_bytes: int = 0          # a last record cut short (a crash mid-write): never acknowledged
    corrupt_records: int = 0     # damaged records before the end: acknowledged, so reported loudly


def encode_record(u: Uplink) -> bytes:
    """One uplink as a journal record (length, CRC-32, body)."""
    transport = u.transport.encode()
    device = u.device_id.encode()
    meta = json.dumps(u.meta, separators=(",", ":"), default=str).encode() if u.meta else b""
    body = b"".join((BODY_HEAD.pack(u.received_at, len(transport), len(device), len(meta)),
                     transport, device, meta, u.payload))
    return RECORD_HEAD.pack(len(body), zlib.crc32(body)) + body


def _decode_body(body: bytes) -> Uplink:
    received_at, nt, nd, nm = BODY_HEAD.unpack_from(body)
    pos = BODY_HEAD.size
    transport = body[pos:pos + nt].decode()
    pos += nt
    device_id = body[pos:pos + nd].decode()
    pos += nd
    meta = json.loads(body[pos:pos + nm]) if nm else {}
    pos += nm
    return Uplink(device_id=device_id, payload=bytes(body[pos:]), transport=transport,
                  received_at=received_at, meta=meta)


def decode_segment(data: bytes, source: str = "segment") -> ReadResult:
    """The uplinks of a segment's bytes; a torn or damaged record is skipped with a log line."""
    if len(data) < len(MAGIC):
        if data and not MAGIC.startswith(data):
            log.error("spool %s: not a journal segment (bad header); kept as is", source)
            return ReadResult([], corrupt_records=1)
        log.warning("spool %s: torn header (%d bytes, crash while creating it): skipped, never acknowledged",
                    source, len(data))
        return ReadResult([], torn_bytes=len(data))
    if data[:len(MAGIC)] != MAGIC:
        log.error("spool %s: not a journal segment (bad header); kept as is", source)
        return ReadResult([], corrupt_records=1)
    uplinks: list[Uplink] = []
    corrupt = 0
    pos, end = len(MAGIC), len(data)
    while pos < end:
        if end - pos < RECORD_HEAD.size:
            return _torn(source, uplinks, end - pos, corrupt)
        length, crc = RECORD_HEAD.unpack_from(data, pos)
        stop = pos + RECORD_HEAD.size + length
        if length < BODY_HEAD.size or length > MAX_RECORD:
            if not any(data[pos:]):
                # A zero-filled tail: the file grew but the data never reached the disk (a crash).
                return _torn(source, uplinks, end - pos, corrupt)
            log.error("spool %s: record at offset %d has an impossible length %d; the %d bytes from there "
                      "cannot be framed", source, pos, length, end - pos)
            return ReadResult(uplinks, corrupt_records=corrupt + 1)
        if stop > end:
            return _torn(source, uplinks, end - pos, corrupt)
        body = data[pos + RECORD_HEAD.size:stop]
        if zlib.crc32(body) != crc:
            if stop == end:
                return _torn(source, uplinks, end - pos, corrupt)
            corrupt += 1
            log.error("spool %s: record at offset %d fails its CRC (disk damage): skipped", source, pos)
        else:
            try:
                uplinks.append(_decode_body(body))
            except (ValueError, UnicodeDecodeError, struct.error) as exc:
                corrupt += 1
                log.error("spool %s: record at offset %d does not decode (%s): skipped", source, pos, exc)
        pos = stop
    return ReadResult(uplinks, corrupt_records=corrupt)


def _torn(source: str, uplinks: list[Uplink], nbytes: int, corrupt: int) -> ReadResult:
    log.warning("spool %s: torn last record (%d bytes, a crash while writing): skipped; "
                "it was never acknowledged, so its transport redelivers it", source, nbytes)
    return ReadResult(uplinks, torn_bytes=nbytes, corrupt_records=corrupt)


class Spool:
    """The journal directory.  `append` is durable when it returns; `segments`, `read` and `remove`
    serve the replay.  Thread-safe: the pipeline appends from one thread and replays from another."""

    def __init__(self, directory: Path | str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # One process per journal: a second gateway on the same directory would interleave batch
        # numbers and replay what the first still owns.  The kernel drops the lock when we die.
        self._lock_fd: int | None = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(f"the spool {self.directory} is in use by another process (one spool "
                               "directory per gateway: name it after the client id)") from None
        self._segments: dict[int, Segment] = {}
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                seq = int(path.name[:-len(SUFFIX)])
            except ValueError:
                log.warning("spool: ignoring %s (not a segment name)", path)
                continue
            self._segments[seq] = self._scan(seq, path)
        if self._segments:
            s = self.status()
            log.warning("spool %s holds %d uplinks (%d bytes) from a previous run: they are replayed first",
                        self.directory, s.uplinks, s.bytes)

    # ------------------------------------------------------------------ writing
    def append(self, seq: int, uplinks: Sequence[Uplink]) -> Segment:
        """Write `uplinks` as segment `seq` and make it durable (file and directory fsync'd).

        Raises SpoolFull past the byte limit (a lone batch is always taken, so an empty spool never
        refuses), OSError when the disk does; in both cases nothing of the batch remains on disk."""
        data = MAGIC + b"".join(encode_record(u) for u in uplinks)
        with self._lock:
            held = sum(s.size for s in self._segments.values())
            if self._segments and held + len(data) > self.max_bytes:
                raise SpoolFull(f"the spool holds {held} bytes; {len(data)} more would pass its limit of "
                                f"{self.max_bytes}")
            if seq in self._segments:
                raise ValueError(f"segment {seq} is already spooled")
        path = self.directory / f"{seq:020d}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._fsync_dir()
        segment = Segment(seq, path, len(data), len(uplinks), uplinks[0].received_at if uplinks else None)
        with self._lock:
            self._segments[seq] = segment
        return segment

    # ------------------------------------------------------------------ replaying
    def segments(self) -> list[Segment]:
        """The spooled batches, oldest first."""
        with self._lock:
            return [self._segments[k] for k in sorted(self._segments)]

    def read(self, segment: Segment) -> ReadResult:
        """A segment's uplinks (as received; their acks are no-ops: they were acknowledged when spooled)."""
        result = decode_segment(segment.path.read_bytes(), segment.path.name)
        if result.corrupt_records:
            keep = segment.path.with_suffix(".corrupt")
            shutil.copyfile(segment.path, keep)
            log.error("spool: %d damaged record(s) in %s; the file is kept as %s for inspection",
                      result.corrupt_records, segment.path.name, keep)
        return result

    def remove(self, segments: Iterable[Segment]) -> None:
        """Forget replayed segments (their transaction has committed)."""
        removed = False
        for segment in segments:
            segment.path.unlink(missing_ok=True)
            with self._lock:
                removed |= self._segments.pop(segment.seq, None) is not None
        if removed:
            self._fsync_dir()

    # ------------------------------------------------------------------ state
    @property
    def empty(self) -> bool:
        with self._lock:
            return not self._segments

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._segments.values())

    def last_seq(self) -> int:
        """The highest segment number on disk (0 when empty): new batches are numbered after it."""
        with self._lock:
            return max(self._segments, default=0)

    def status(self) -> SpoolStatus:
        with self._lock:
            segs = [self._segments[k] for k in sorted(self._segments)]
        oldest = next((s.first_received_at for s in segs if s.first_received_at is not None), None)
        return SpoolStatus(directory=str(self.directory), segments=len(segs), uplinks=sum(s.uplinks for s in segs),
                           bytes=sum(s.size for s in segs), limit_bytes=self.max_bytes, oldest_received_at=oldest)

    def close(self) -> None:
        """Release the directory (what is spooled stays on disk for the next start)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _scan(self, seq: int, path: Path) -> Segment:
        # A segment from a previous run: count its records by their framing (no decoding) and read
        # the first one's arrival time; damage is reported when the segment is replayed.
        data = path.read_bytes()
        count, first, pos = 0, None, len(MAGIC)
        while pos + RECORD_HEAD.size <= len(data):
            length, _ = RECORD_HEAD.unpack_from(data, pos)
            if length < BODY_HEAD.size or pos + RECORD_HEAD.size + length > len(data):
                break
            if first is None:
                first = BODY_HEAD.unpack_from(data, pos + RECORD_HEAD.size)[0]
            count += 1
            pos += RECORD_HEAD.size + length
        return Segment(seq, path, len(data), count, first)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
