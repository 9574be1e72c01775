"""Re-decoding rejected uplinks after a fix (a codec, a model's settings, a device registered late).

`redecode` runs the bytes kept in rejected_uplinks through today's registry and codecs — the write
path of a live uplink (`ingest.batch.BatchBuilder`, `ingest.writer.Writer`): the same readings, radio
rows, rollups and device liveness, at the uplink's original receive time.  What a caller can rely on:

* **Exactly once.**  A reject that now decodes is marked (``redecoded_at``, ``redecoded_by``, migration
  13) in the transaction that writes its rows; a run reads only unmarked rejects and locks them
  (``FOR UPDATE SKIP LOCKED``), so running it twice, or two runs at once, store each frame once.
* **The logs stay truthful.**  The reject row keeps its bytes, reason and detail (what happened on
  arrival); the raw log keeps its ``rejected:<reason>`` row and gains the ``stored`` row a live
  uplink would have written, at the original receive time, its meta naming the reject
  (``{"redecoded_from": reject_id}``).  A frame that still fails writes nothing: no second reject row.
* **Not re-decoded:** ``too_large`` rejects (only their first KiB was kept); they are counted as still
  rejected.  Dedup keys are not claimed again: the frame's key was claimed when it arrived (a
  retransmission of it was then a duplicate), and the mark is what makes the re-decode happen once.
* Work is done in chunks of `chunk` rejects, one transaction each, oldest first, up to `limit`
  rejects per call; `more` says whether matching rejects were left for another call.  `progress`,
  when given, is called after each chunk committed with the totals so far (the API's job runner
  records them, api/jobs.py); an exception it raises stops the run there, the chunks done committed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from iotjx.model import Uplink

from .aggregates import Aggregator
from .batch import BatchBuilder
from .registry import DeviceRegistry
from .rejects import TOO_LARGE
from .writer import WriteSet, Writer

REDECODED_FROM = "redecoded_from"      # the raw-log meta key naming the reject a stored row came from


@dataclass(frozen=True, slots=True)
class RejectFilter:
    """Which rejects: every given field must match (None: any).  `model` is the model the device is
    registered with now; `since`/`until` bound received_at as [since, until); `redecoded` False: only
    rejects not stored by a re-decode yet, True: only those that were."""

    reason: str | None = None
    device_id: str | None = None
    transport: str | None = None
    codec: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    redecoded: bool | None = None


def filter_sql(f: RejectFilter, cities: tuple[int, ...] | None, alias: str = "r") -> tuple[str, dict[str, Any]]:
    """A WHERE condition (over rejected_uplinks as `alias`) and its parameters for `f` and a key's
    city scope: with `cities`, only rejects of devices registered now at a site of those cities (an
    unknown device's reject belongs to no city)."""
    r = alias
    sql = f"""
        (%(f_reason)s::text IS NULL OR {r}.reason = %(f_reason)s)
        AND (%(f_device)s::text IS NULL OR {r}.device_id = %(f_device)s)
        AND (%(f_transport)s::text IS NULL OR {r}.transport = %(f_transport)s)
        AND (%(f_codec)s::text IS NULL OR {r}.codec = %(f_codec)s)
        AND (%(f_since)s::timestamptz IS NULL OR {r}.received_at >= %(f_since)s)
        AND (%(f_until)s::timestamptz IS NULL OR {r}.received_at < %(f_until)s)
        AND (%(f_redecoded)s::boolean IS NULL OR ({r}.redecoded_at IS NOT NULL) = %(f_redecoded)s)
        AND (%(f_model)s::text IS NULL OR EXISTS (
                SELECT 1 FROM devices fd WHERE fd.device_id = {r}.device_id AND fd.model = %(f_model)s))
        AND (%(f_cities)s::int[] IS NULL OR EXISTS (
                SELECT 1 FROM devices cd JOIN sites cs ON cs.site_id = cd.site_id
                WHERE cd.device_id = {r}.device_id AND cs.city_code = ANY(%(f_cities)s)))"""
    params = {"f_reason": f.reason, "f_device": f.device_id, "f_transport": f.transport, "f_codec": f.codec,
              "f_since": f.since, "f_until": f.until, "f_redecoded": f.redecoded, "f_model": f.model,
              "f_cities": None if cities is None else list(cities)}
    return sql, params


@dataclass(frozen=True, slots=True)
class RedecodeResult:
    """What one `redecode` call did: rejects examined, stored now, and those still rejected by reason
    (today's reason; ``too_large`` ones are not re-decoded)."""

    examined: int
    stored: int
    still_rejected: dict[str, int]
    more: bool                         # matching rejects left past `limit`: call again with `after`
    last_reject_id: int | None         # the last reject examined (pass it as `after` to go on)


_PICK = """
    SELECT r.reject_id, r.received_at, r.device_id, r.transport, r.payload, r.meta, r.reason
    FROM rejected_uplinks r
    WHERE r.redecoded_at IS NULL AND r.reject_id > %(after)s AND {where}
    ORDER BY r.reject_id
    LIMIT %(n)s
    FOR UPDATE OF r SKIP LOCKED"""


def redecode(connect: Callable[[], psycopg.Connection], f: RejectFilter, *, actor: str,
             cities: tuple[int, ...] | None = None, after: int = 0, limit: int = 10_000, chunk: int = 500,
             aggregator: Aggregator | None | bool = True,
             progress: Callable[[RedecodeResult], None] | None = None) -> RedecodeResult:
    """Re-decode the rejects matching `f` (and the city scope `cities`) not stored yet; see the module
    docstring.  `connect` opens a connection (the registry and the writer each hold one, closed at the
    end); `aggregator` as `ingest.writer.Writer` takes it (the gateway's IOTJX_TIMEZONE and
    IOTJX_ROLLUPS); `actor` is recorded as redecoded_by; only rejects with an id above `after` are
examined (a call that stopped at `limit` is continued with its `last_reject_id`)."""
    if not actor or not actor.strip():
        raise ValueError("redecode needs an actor (who asked for it)")
    if limit < 1 or chunk < 1:
        raise ValueError(f"limit and chunk must be at least 1, not {limit} and {chunk}")
    if f.redecoded:
        return RedecodeResult(0, 0, {}, False, None)    # already stored: nothing to do
    where, params = filter_sql(f, cities)
    pick = _PICK.format(where=where)
    registry = DeviceRegistry(connect, ttl_s=0.0, unknown_ttl_s=0.0)   # today's registry, no cache
    builder = BatchBuilder(registry)
    writer = Writer(connect, aggregator=aggregator)
    examined = stored = 0
    still: Counter[str] = Counter()
    more = False
    try:
        while True:
            n = min(chunk, limit - examined)
            if n <= 0:
                with writer.conn.transaction():
                    more = writer.conn.execute(pick.replace("LIMIT %(n)s", "LIMIT 1").replace(
                        "FOR UPDATE OF r SKIP LOCKED", ""), {**params, "after": after, "n": 1}).fetchone() is not None
                break
            with writer.transaction() as tx:
                conn = writer.conn
                rows = conn.execute(pick, {**params, "after": after, "n": n}).fetchall()
                if not rows:
                    break
                after = rows[-1][0]
                examined += len(rows)
                uplinks: list[tuple[int, Uplink]] = []
                for reject_id, received_at, device_id, transport, payload, meta, reason in rows:
                    if reason == TOO_LARGE:
                        still[TOO_LARGE] += 1
                        continue
                    uplinks.append((reject_id, Uplink(device_id=device_id, payload=bytes(payload), transport=transport,
                                                      received_at=received_at.timestamp(),
                                                      meta={**(meta or {}), REDECODED_FROM: reject_id})))
                ws = WriteSet()
                builder.build([u for _, u in uplinks], ws)
                done = []
                for reject_id, u in uplinks:
                    outcome = ws.outcome(u)
                    if outcome.status == "stored":
                        done.append(reject_id)
                    else:
                        still[outcome.reason or outcome.status] += 1
                # A frame that still fails is already in both logs: nothing more is written for it.
                ws.rejects, ws.reject_sources, ws.reject_at, ws.reject_kept = [], [], [], None
                tx.write(ws)
                if done:
                    conn.execute("UPDATE rejected_uplinks SET redecoded_at = now(), redecoded_by = %s "
                                 "WHERE reject_id = ANY(%s)", (actor, done))
                stored += len(done)
            if progress is not None:
                progress(RedecodeResult(examined, stored, dict(sorted(still.items())), False, after))
            if len(rows) < n:
                break
    finally:
        writer.close()
        registry.close()
    return RedecodeResult(examined, stored, dict(sorted(still.items())), more, after if examined else None)
