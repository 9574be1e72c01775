"""The shared frame of an incremental analytics update (fire_alarms, water_*): one transaction holding an
advisory lock, a watermark that follows the data (the latest receive time read), a re-read margin behind
it, a temp table of what the run touches, and the watermark moved forward at the end.

    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        run = begin(cur, lock_id=LOCK_ID, progress_table="fire_alarm_progress", touched_table="fire_touched",
                    margin_s=margin_s, full=full)
        ... CREATE TEMP TABLE fire_touched ON COMMIT DROP AS ... WHERE e.time > run.since ...
        read_to = advance(cur, run, seen_to)

The progress table has one row (key column ``one``) with ``read_to`` and ``updated_at``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg


@dataclass(frozen=True, slots=True)
class Run:
    """An update's start: the watermark stored (None: nothing read yet) and `since`, the receive time
    after which rows are read (None: all, a first or a full run)."""

    progress_table: str
    previous: datetime | None
    since: datetime | None


def begin(cur: psycopg.Cursor, *, lock_id: int, progress_table: str, touched_table: str, margin_s: float,
          full: bool) -> Run:
    """Take the transaction-scoped advisory lock `lock_id` (waiting for a run elsewhere), read the
    watermark, and drop `touched_table` left by a caller's transaction that ran an update before.
    `cur` must return dict rows and be inside a transaction; ValueError for a negative margin."""
    if margin_s < 0:
        raise ValueError(f"margin_s must be >= 0, not {margin_s}")
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id,))
    row = cur.execute(f"SELECT read_to FROM {progress_table}").fetchone()
    previous = None if row is None else row["read_to"]
    since = None if full or previous is None else previous - timedelta(seconds=margin_s)
    cur.execute(f"DROP TABLE IF EXISTS {touched_table}")
    return Run(progress_table, previous, since)


def advance(cur: psycopg.Cursor, run: Run, seen_to: datetime | None) -> datetime | None:
    """Store the watermark after this run — the later of the stored one and `seen_to` (the latest
    receive time read now), never moving back — and return it (None: still nothing read)."""
    read_to = max((t for t in (seen_to, run.previous) if t is not None), default=None)
    if read_to is not None:
        cur.execute(f"""INSERT INTO {run.progress_table} (read_to) VALUES (%s)
                        ON CONFLICT (one) DO UPDATE SET read_to = greatest({run.progress_table}.read_to, excluded.read_to),
                                                       updated_at = now()""", (read_to,))
    return read_to
