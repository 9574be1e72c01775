"""Coverage against the targets (now, or as of a past day), the targets catalogue, the figures
operators enter, and the daily snapshots.  Every figure is computed in analytics/coverage.py.

A city-scoped key sees the targets of its cities and the breakdown rows of its cities; province-wide
targets are figures over every city, so they are left out for it (and are a 404 to their routes, like
a target that does not exist)."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from analytics.coverage import (PACE_WINDOW_DAYS, NoSnapshot, daily_values, local_day, report_as_of,
                                snapshot_range, take_snapshot)
from api.deps import AppSettings, Conn, Operator, TargetId, Viewer, WholeProvinceAdmin, audit_write
from api.problems import PROBLEM
from api.schemas import CityCode, Note, city_names
from iotjx.apikeys import ApiKey
from iotjx.targets import CoverageTarget

router = APIRouter(tags=["coverage"])

EARLIEST_DAY = date(2000, 1, 1)
MAX_PROGRESS = 1e15


class SiteCriteriaOut(BaseModel):
    """Which catalogue sites a site measure counts."""

    kind: str
    min_grade: str | None = Field(description="a scenic spot's lowest grade counted (`4A`: 4A and 5A)")
    grades: list[str] = Field(description="exactly these grades (empty: any)")
    model_site: bool = Field(description="only sites flagged as model sites")


class DeviceCriteriaOut(BaseModel):
    """Which devices a target counts."""

    families: list[str]
    models: list[str]
    network: str | None


class DayValue(BaseModel):
    day: date
    value: float | None


class CityNames(BaseModel):
    """`city` is the division code; its names ride along (null without a city)."""

    city: int | None = Field(description="division code, e.g. 360600; null: the whole province / no site")
    city_name_zh: str | None
    city_name_en: str | None


class TargetOut(CityNames):
    """A target of the catalogue: what it counts, against which value, by when."""

    target_id: str
    source: Literal["plan", "programme"]
    clause_zh: str
    clause_en: str
    target_zh: str
    target_en: str
    value: float = Field(description="the value to reach")
    unit: str
    deadline: date
    measure: str
    pilot: str | None = Field(description="the pilot of the devices counted, when they all belong to one")
    network: str | None
    sites: list[SiteCriteriaOut] = Field(description="site measures: which catalogue sites count (any criterion)")
    devices: DeviceCriteriaOut | None = Field(description="which devices count: families and/or models, network")
    min_live: int | None = Field(description="site measures: live devices a site needs")
    min_live_share: float | None = Field(description="site measures: percent of a site's active devices live")


class TargetStanding(CityNames):
    """One target: its definition, its value on the day described, its verdict and pace."""

    target_id: str
    source: Literal["plan", "programme"]
    clause_zh: str
    clause_en: str
    target_zh: str
    target_en: str
    measure: str
    unit: str
    target: float = Field(description="the value to reach")
    deadline: date
    pilot: str | None = Field(description="the pilot of the devices counted, when they all belong to one")
    network: str | None
    sites: list[SiteCriteriaOut] = Field(description="site measures: which catalogue sites count (any criterion)")
    devices: DeviceCriteriaOut | None = Field(description="which devices count: families and/or models, network")
    min_live: int | None = Field(description="site measures: live devices a site needs")
    min_live_share: float | None = Field(description="site measures: percent of a site's active devices live")
    value: float | None = Field(description="the figure: live devices, sites meeting the minimum, a percent of "
                                            "sites, or the operators' entry; null when nothing was measured")
    percent: float | None = Field(description="value / target × 100")
    registered: int | None = Field(description="devices counted (at the sites in scope), inactive included")
    active: int | None
    live: int | None
    sites_in_scope: int | None = Field(description="site measures: catalogue sites open that day matching the criteria")
    sites_meeting: int | None
    status: Literal["met", "missed", "on_track", "at_risk", "unknown"]
    met_at_deadline: bool | None = Field(description="once the deadline has passed: whether the value that day met it")
    value_at_deadline: float | None
    pace_needed: float | None = Field(description="per day, from the day described to the deadline")
    pace_observed: float | None = Field(description="per day, over the last 30 days of snapshots")
    observed_days: int | None
    projected_date: date | None
    at_risk: bool | None
    history: list[DayValue] = Field(description="daily values before the day described (snapshots)")


class BreakdownRow(CityNames):
    pilot: str
    network: str
    registered: int
    active: int
    live: int


class CoverageOut(BaseModel):
    source: Literal["live", "snapshot"] = Field(description="live: computed from the registry and device state; "
                                                           "snapshot: the stored end of a past day")
    day: date = Field(description="the local day described")
    state_at: datetime = Field(description="the instant the figures describe")
    generated_at: datetime = Field(description="when they were computed")
    live_factor: float
    timezone: str
    targets: list[TargetStanding]
    breakdown: list[BreakdownRow]
    unverified: dict[str, int] = Field(description="devices at free-text sites, never counted toward a plan target "
                                                   "(live reports only)")


def _named(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with the names of its city as `city_name_zh`, `city_name_en` (one spelling everywhere)."""
    out = {k: v for k, v in row.items() if k not in ("city_name", "city_zh", "city_en")}
    return {**out, **city_names(row.get("city"))}


def _visible(request: Request, key: ApiKey) -> list[CoverageTarget]:
    """The catalogue's targets this key may see."""
    return [t for t in request.app.state.catalogue if key.cities is None or t.city in key.cities]


def _target(request: Request, key: ApiKey, target_id: str) -> CoverageTarget:
    target = next((t for t in _visible(request, key) if t.target_id == target_id), None)
    if target is None:
        raise HTTPException(404, f"no target {target_id}")
    return target


def _today(settings) -> date:
    return local_day(datetime.now().astimezone(), settings.tz)


@router.get("/coverage", response_model=CoverageOut, responses={403: PROBLEM, 404: PROBLEM, 422: PROBLEM},
            summary="Every target's value, verdict and pace, and the breakdown by city × pilot × network",
            description="Without `as_of`: now, from a report recomputed in one pass every IOTJX_COVERAGE_REFRESH_S "
                        "(`generated_at` says when).  With `as_of`: the end of that past local day, from its "
                        "snapshot (404 when none was taken).  Definitions: README \"Coverage\".")
def coverage(key: Viewer, request: Request, conn: Conn, settings: AppSettings,
             city: Annotated[CityCode | None, Query(description="division code, e.g. 360600")] = None,
             pilot: Literal["water", "fire", "traffic"] | None = None,
             network: Literal["nbiot", "cat1"] | None = None,
             as_of: Annotated[date | None, Query(description="a past local day, e.g. 2022-12-31")] = None,
             history_days: Annotated[int, Query(ge=0, le=3660, description="days of daily values per target")] = 30,
             ) -> CoverageOut:
    if city is not None and not key.sees_city(city):
        raise HTTPException(403, f"city {city} is outside this key's cities")
    visible = {t.target_id for t in _visible(request, key)}
    if as_of is not None:
        today = _today(settings)
        if not EARLIEST_DAY <= as_of < today:
            raise HTTPException(422, f"as_of must be a past day, {EARLIEST_DAY} to {today - timedelta(days=1)}; "
                                     "for today ask without as_of")
        try:
            report = report_as_of(conn, request.app.state.catalogue, as_of, history_days=history_days)
        except NoSnapshot as exc:
            raise HTTPException(404, str(exc)) from None
    else:
        report = request.app.state.coverage.report()
    first = report.day - timedelta(days=history_days)
    longer = None
    if as_of is None and history_days > PACE_WINDOW_DAYS:     # the kept report holds the pace window's days
        longer = daily_values(conn, [t for t in request.app.state.catalogue if t.target_id in visible],
                              report.day, history_days)
    targets = []
    for row in report.targets:
        if row["target_id"] not in visible:
            continue
        if (city is not None and row["city"] not in (None, city)) or (pilot is not None and row["pilot"] not in (None, pilot)) \
                or (network is not None and row["network"] not in (None, network)):
            continue
        history = longer[row["target_id"]] if longer is not None else row["history"]
        targets.append({**_named(row), "history": [h for h in history if h["day"] >= first]})
    table = [r for r in report.breakdown if key.sees_city(r["city"]) and (city is None or r["city"] == city)
             and (pilot is None or r["pilot"] == pilot) and (network is None or r["network"] == network)]
    return CoverageOut(source=report.source, day=report.day, state_at=report.state_at,
                       generated_at=report.generated_at, live_factor=settings.live_factor,
                       timezone=settings.timezone, targets=targets, breakdown=[_named(r) for r in table],
                       unverified=report.unverified if key.cities is None else {})


@router.get("/targets", response_model=list[TargetOut], summary="The targets catalogue: what each target counts",
            description="A city-scoped key sees its cities' targets only (province-wide ones are every city's).")
def targets(key: Viewer, request: Request) -> list[TargetOut]:
    return [TargetOut(**_named(t.as_dict())) for t in _visible(request, key)]


class HistoryPoint(BaseModel):
    """A day's value; device- and site-measured targets also give its counts and the target that day."""

    day: date
    value: float | None
    registered: int | None = None
    active: int | None = None
    live: int | None = None
    sites_in_scope: int | None = None
    sites_meeting: int | None = None
    target: float | None = Field(None, description="the target value as the catalogue said that day")


class TargetHistory(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    target_id: str
    since: date = Field(alias="from", description="the first day asked")
    until: date = Field(alias="to", description="the last day asked")
    series: list[HistoryPoint]


@router.get("/targets/{target_id}/history", response_model=TargetHistory, responses={404: PROBLEM, 422: PROBLEM},
            summary="A target's daily values (snapshots; entries for operator targets)")
def target_history(key: Viewer, target_id: TargetId, request: Request, conn: Conn,
                   since: Annotated[date | None, Query(alias="from", description="first day (default: 365 days back)")] = None,
                   until: Annotated[date | None, Query(alias="to", description="last day (default: yesterday)")] = None,
                   ) -> TargetHistory:
    from analytics.coverage import figure_series, operator_entries

    target = _target(request, key, target_id)
    today = _today(request.app.state.settings)
    until = until or today - timedelta(days=1)
    since = since or until - timedelta(days=365)
    if since > until or since < EARLIEST_DAY or until > today or (until - since).days > 3660:
        raise HTTPException(422, "from must not be after to, both from 2000-01-01 to today, at most 3660 days apart")
    if target.measure == "operator":
        days = sorted(figure_series(operator_entries(conn, [target_id], until)[target_id], since, until).items())
        series = [{"day": d, "value": v} for d, v in days]
    else:
        series = [{"day": d, "value": v, "registered": r, "active": a, "live": lv, "sites_in_scope": s,
                   "sites_meeting": m, "target": tv}
                  for d, v, r, a, lv, s, m, tv in conn.execute("""
                      SELECT day, value, registered, active, live, sites, sites_meeting, target_value
                      FROM coverage_snapshots WHERE target_id = %s AND day BETWEEN %s AND %s ORDER BY day""",
                                                                (target_id, since, until))]
    return TargetHistory(target_id=target_id, since=since, until=until, series=series)


class Progress(BaseModel):
    value: float = Field(allow_inf_nan=False, ge=0, le=MAX_PROGRESS,
                         description="a finite number from 0; at most 100 for a percent target")
    as_of: date | None = Field(None, description="the day the figure describes (default: today, local)")
    note: Note = ""

    @model_validator(mode="after")
    def _day(self) -> Progress:
        if self.as_of is not None and self.as_of < EARLIEST_DAY:
            raise ValueError(f"as_of must be {EARLIEST_DAY} or later")
        return self


class ProgressEntry(BaseModel):
    entry_id: int
    value: float
    as_of: date = Field(description="the day the figure describes")
    note: str
    actor: str = Field(description="who entered it: `key:<key_id>` or `cli:<user>`")
    entered_at: datetime


class ProgressEntered(ProgressEntry):
    target_id: str


@router.put("/targets/{target_id}/progress", response_model=ProgressEntered,
            summary="Enter the figure of a target no device measures",
            description="Every entry is kept (who, when, for which day, the note); the figure of a day is the latest "
                        "entry describing that day or an earlier one.",
            responses={404: PROBLEM, 409: PROBLEM, 422: PROBLEM})
def set_progress(key: Operator, target_id: TargetId, progress: Annotated[Progress, Body()], request: Request,
                 conn: Conn, settings: AppSettings) -> ProgressEntered:
    target = _target(request, key, target_id)
    if target.measure != "operator":
        raise HTTPException(409, f"{target_id} is measured from devices ({target.measure}), not entered")
    today = _today(settings)
    as_of = progress.as_of or today
    if as_of > today:
        raise HTTPException(422, f"as_of {as_of} is in the future: a figure describes a day that has begun")
    if target.percent_unit and progress.value > 100:
        raise HTTPException(422, f"{target_id} is a percent: at most 100, not {progress.value}")
    with conn.transaction():
        entry_id, entered_at = conn.execute("""
            INSERT INTO target_progress_log (target_id, value, as_of, note, actor) VALUES (%s, %s, %s, %s, %s)
            RETURNING entry_id, entered_at""", (target_id, progress.value, as_of, progress.note, key.actor)).fetchone()
        audit_write(conn, request, key, target=target_id,
                    change={"value": progress.value, "as_of": str(as_of), "note": progress.note}, status=200)
    return ProgressEntered(entry_id=entry_id, target_id=target_id, value=progress.value, as_of=as_of,
                           note=progress.note, actor=key.actor, entered_at=entered_at)


@router.get("/targets/{target_id}/progress", response_model=list[ProgressEntry], responses={404: PROBLEM},
            summary="Every figure entered for an operator target, newest first")
def progress_entries(key: Viewer, target_id: TargetId, request: Request, conn: Conn) -> list[ProgressEntry]:
    _target(request, key, target_id)
    return [ProgressEntry(entry_id=e, value=v, as_of=d, note=n, actor=a, entered_at=at)
            for e, v, d, n, a, at in conn.execute("""
                SELECT entry_id, value, as_of, note, actor, entered_at FROM target_progress_log
                WHERE target_id = %s ORDER BY entered_at DESC, entry_id DESC""", (target_id,))]


class SnapshotDay(BaseModel):
    day: date
    state_at: datetime = Field(description="the instant described: the end of the local day")
    taken_at: datetime
    how: str = Field(description="scheduled, filled or retaken")
    devices: int = Field(description="devices registered at state_at")
    duration_s: float


class SnapshotsOut(BaseModel):
    first: date | None
    last: date | None
    count: int
    days: list[SnapshotDay] = Field(description="newest first, at most `limit`")


@router.get("/coverage/snapshots", response_model=SnapshotsOut, summary="The days whose coverage snapshot was taken")
def snapshots(key: Viewer, conn: Conn,
              limit: Annotated[int, Query(ge=1, le=3660)] = 100) -> SnapshotsOut:
    first, last, n = snapshot_range(conn)
    days = [SnapshotDay(day=d, state_at=s, taken_at=t, how=h, devices=dv, duration_s=round(du, 3))
            for d, s, t, h, dv, du in conn.execute("""
                SELECT day, state_at, taken_at, how, devices, duration_s FROM coverage_snapshot_days
                ORDER BY day DESC LIMIT %s""", (limit,))]
    return SnapshotsOut(first=first, last=last, count=n, days=days)


class SnapshotRequest(BaseModel):
    day: date = Field(description="a past local day")
    retake: bool = Field(False, description="replace the day's snapshot if it exists (after late data)")


class SnapshotTaken(BaseModel):
    day: date
    taken: bool = Field(description="false: the day had a snapshot already (retake to replace it)")
    detail: str


@router.post("/coverage/snapshots", response_model=SnapshotTaken, summary="Take (or retake) one past day's snapshot from the stored uplinks",
             description="Province-wide history: an admin key without a city scope.",
             responses={403: PROBLEM, 422: PROBLEM})
async def take(key: WholeProvinceAdmin, body: Annotated[SnapshotRequest, Body()], request: Request) -> SnapshotTaken:
    settings = request.app.state.settings
    today = _today(settings)
    if not EARLIEST_DAY <= body.day < today:
        raise HTTPException(422, f"day must be a past day, {EARLIEST_DAY} to {today - timedelta(days=1)}")

    def run() -> bool:
        with request.app.state.pool.connection() as conn:
            taken = take_snapshot(conn, body.day, request.app.state.catalogue, settings,
                                  how="filled", retake=body.retake)
            with conn.transaction():
                audit_write(conn, request, key, target=str(body.day), change=body.model_dump(mode="json"), status=200)
            return taken

    taken = await run_in_threadpool(run)
    return SnapshotTaken(day=body.day, taken=taken, detail="taken" if taken else "already taken (retake to replace it)")
