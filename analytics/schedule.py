"""Scheduled analytics: the steps that bring stored figures up to date with the stored readings, run by
`iotjx analytics run` and by a loop in the API process every ``IOTJX_ANALYTICS_INTERVAL_S``.

The steps, in this order (`STEPS`):

* ``fire``: `analytics.fire.update_alarms` — the alarm and fault lifecycles in ``fire_alarms``;
* ``water``: `analytics.water.update_water` — ``water_daily``, ``water_night``, ``water_alerts``, with the
  ``IOTJX_WATER_*`` thresholds (`Settings.water_rules`, `Settings.water_night_window`);
* ``coverage``: `analytics.coverage.fill_snapshots` — every missing past day's coverage snapshot.

Each step is idempotent and incremental on its own (its advisory lock, its watermark), so a round can be
repeated, or cut short by an outage at any point, and the next round completes it.  ``full=True`` makes
the fire and water steps recompute everything (after a long outage, or a threshold changed).

Several processes: a round holds the session advisory lock `ROUND_LOCK` from start to end.  The loop
(`AnalyticsLoop`, ``wait=False``) tries it and **skips** the round when another process holds it, so two
API replicas run the steps once per interval between them, not twice over; `iotjx analytics run`
(``wait=True``) **waits** for it, so an operator's run is never skipped and sees the other's work.  The
steps' own locks keep any other caller (`iotjx report water` updates first) from interleaving with a
round.  A failing step is reported and the next one still runs, unless the connection itself is gone."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import psycopg

log = logging.getLogger(__name__)

ROUND_LOCK = 0x10_5C_ED              # pg_advisory_lock key: one scheduled round at a time, across processes
STEPS = ("fire", "water", "coverage")

Connect = Callable[[], AbstractContextManager[psycopg.Connection]]


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step did: `rows` written (inserted, updated, merged, taken), a one-line `detail`, its
    wall time, and `error` (None when it succeeded)."""

    name: str
    rows: int
    detail: str
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class RoundResult:
    """One round: the steps run, in order; `skipped` when another process held the round's lock (no
    step ran); `not_run` the steps left out because the connection broke."""

    steps: tuple[StepResult, ...] = ()
    skipped: bool = False
    not_run: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.not_run and all(s.ok for s in self.steps)


def parse_steps(text: str | None) -> tuple[str, ...]:
    """`--only fire,water` as step names in `STEPS`' order; None or empty: all.  ValueError naming the
    unknown ones."""
    if text is None or not text.strip():
        return STEPS
    asked = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in asked if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown analytics step(s) {', '.join(map(repr, unknown))}; known: {', '.join(STEPS)}")
    return tuple(s for s in STEPS if s in asked)


def _fire(conn: psycopg.Connection, connect: Connect, settings, catalogue, full: bool) -> tuple[int, str]:
    from analytics.fire import update_alarms

    r = update_alarms(conn, full=full)
    return (r.inserted + r.updated + r.merged,
            f"{r.components} component(s) re-read: {r.inserted} inserted, {r.updated} updated, {r.merged} merged")


def _water(conn: psycopg.Connection, connect: Connect, settings, catalogue, full: bool) -> tuple[int, str]:
    from analytics.water import update_water

    r = update_water(conn, tz=settings.tz, full=full, night_window=settings.water_night_window,
                     rules=settings.water_rules)
    return (r.days + r.alerts,
            f"{r.devices} meter(s) recomputed: {r.days} meter-day(s), {r.sites} site(s)' nights, {r.alerts} alert row(s)")


def _coverage(conn: psycopg.Connection, connect: Connect, settings, catalogue, full: bool) -> tuple[int, str]:
    from analytics.coverage import fill_snapshots

    if catalogue is None:
        from iotjx.targets import load_catalogue
        catalogue = load_catalogue(settings.targets_file)
    taken = fill_snapshots(connect, catalogue, settings)
    return len(taken), (f"snapshot(s) of {', '.join(map(str, taken))} taken" if taken else "no day to take")


_RUN = {"fire": _fire, "water": _water, "coverage": _coverage}


def run_round(connect: Connect, settings, *, steps: Sequence[str] = STEPS, catalogue=None, wait: bool = False,
              full: bool = False) -> RoundResult:
    """Run `steps` once (see the module docstring) on a connection from `connect` (a context manager, as
    `pool.connection` or `iotjx.db.connect`; the coverage step opens a second one).  `wait`: wait for a
    round running elsewhere instead of skipping.  A step's failure is in its result; psycopg's error
    when the database cannot be reached at all (nothing ran)."""
    unknown = [s for s in steps if s not in _RUN]
    if unknown:
        raise ValueError(f"unknown analytics step(s) {unknown}; known: {', '.join(STEPS)}")
    done: list[StepResult] = []
    with connect() as conn:
        conn.autocommit = True
        if wait:
            conn.execute("SELECT pg_advisory_lock(%s)", (ROUND_LOCK,))
        elif not conn.execute("SELECT pg_try_advisory_lock(%s)", (ROUND_LOCK,)).fetchone()[0]:
            return RoundResult(skipped=True)
        try:
            for k, name in enumerate(steps):
                started = time.perf_counter()
                try:
                    rows, detail = _RUN[name](conn, connect, settings, catalogue, full)
                    done.append(StepResult(name, rows, detail, time.perf_counter() - started))
                except Exception as exc:          # reported in the result; the other steps still run
                    done.append(StepResult(name, 0, "", time.perf_counter() - started, _describe(exc)))
                    if conn.closed or conn.broken:
                        return RoundResult(tuple(done), not_run=tuple(steps[k + 1:]))
        finally:
            if not (conn.closed or conn.broken):
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (ROUND_LOCK,))
                except psycopg.Error:
                    pass                          # the session ends with the connection: so does its lock
    return RoundResult(tuple(done))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class AnalyticsLoop:
    """Runs `run_round` every `interval_s` (default ``settings.analytics_interval_s``; 0: `start` does
    nothing) on a daemon thread, skipping a round another process is running.  A database that does not
    answer is logged once (and its return once), a failing step once until it succeeds again: no
    traceback per interval.  `last` is the latest round's result."""

    def __init__(self, connect: Connect, settings, *, catalogue=None, steps: Sequence[str] = STEPS,
                 interval_s: float | None = None) -> None:
        self._connect = connect
        self.settings = settings
        self.catalogue = catalogue
        self.steps = tuple(steps)
        self.interval_s = settings.analytics_interval_s if interval_s is None else interval_s
        self.last: RoundResult | None = None
        self.rounds = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable = False
        self._failing: set[str] = set()

    def start(self) -> None:
        if self.interval_s <= 0:
            log.info("scheduled analytics off (IOTJX_ANALYTICS_INTERVAL_S=0)")
            return
        self._thread = threading.Thread(target=self._run, name="analytics", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def run_once(self) -> RoundResult | None:
        """One round now, logged as the loop logs it; None when the database did not answer."""
        try:
            result = run_round(self._connect, self.settings, steps=self.steps, catalogue=self.catalogue)
        except (psycopg.Error, OSError) as exc:
            if not self._unreachable:
                log.warning("scheduled analytics: the database does not answer (%s); retrying every %g s",
                            _describe(exc), self.interval_s)
            self._unreachable = True
            return None
        except Exception:                 # a bug outside the steps: said once, with its traceback; the loop goes on
            if not self._unreachable:
                log.exception("scheduled analytics: the round failed; retrying every %g s", self.interval_s)
            self._unreachable = True
            return None
        if self._unreachable:
            log.info("scheduled analytics: rounds run again")
        self._unreachable = False
        self.last, self.rounds = result, self.rounds + 1
        for step in result.steps:
            if step.ok:
                if step.name in self._failing:
                    log.info("scheduled analytics: %s works again", step.name)
                self._failing.discard(step.name)
                if step.rows:
                    log.info("scheduled analytics: %s: %s (%.2f s)", step.name, step.detail, step.seconds)
            else:
                if step.name not in self._failing:
                    log.warning("scheduled analytics: %s failed: %s; retried every %g s", step.name, step.error,
                                self.interval_s)
                self._failing.add(step.name)
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.interval_s)
