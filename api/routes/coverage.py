"""Coverage against the targets, the targets catalogue, and the figures operators enter.

A city-scoped key sees the targets of its cities and the breakdown rows of its cities; province-wide
targets are figures over every city, so they are left out for it (and are a 404 to its progress
entry, like a target that does not exist)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, Request
from pydantic import BaseModel, Field

from analytics.coverage import breakdown, coverage_report
from api.deps import AppSettings, Conn, Operator, TargetId, Viewer, audit_write
from api.problems import PROBLEM
from api.schemas import CityCode, Note
from iotjx.apikeys import ApiKey

router = APIRouter(tags=["coverage"])

class Progress(BaseModel):
    value: float = Field(allow_inf_nan=False, ge=-1e15, le=1e15, description="a finite number")
    note: Note = ""


class CoverageOut(BaseModel):
    generated_at: datetime
    live_factor: float
    targets: list[dict[str, Any]]
    breakdown: list[dict[str, Any]]


def _visible(request: Request, key: ApiKey) -> list:
    """The catalogue's targets this key may see."""
    return [t for t in request.app.state.catalogue if key.cities is None or t.city in key.cities]


@router.get("/coverage", response_model=CoverageOut, responses={403: PROBLEM},
            summary="Coverage against every target, and by city/pilot/network")
def coverage(key: Viewer, request: Request, conn: Conn, settings: AppSettings,
             city: Annotated[CityCode | None, Query(description="division code, e.g. 360600")] = None,
             pilot: Literal["water", "fire", "traffic"] | None = None,
             network: Literal["nbiot", "cat1"] | None = None) -> CoverageOut:
    if city is not None and not key.sees_city(city):
        raise HTTPException(403, f"city {city} is outside this key's cities")
    now = datetime.now().astimezone()
    rows = coverage_report(conn, _visible(request, key), live_factor=settings.live_factor, now=now,
                           city=city, pilot=pilot, network=network)
    table = breakdown(conn, live_factor=settings.live_factor, now=now)
    table = [r for r in table if key.sees_city(r["city"]) and (city is None or r["city"] == city)
             and (pilot is None or r["pilot"] == pilot) and (network is None or r["network"] == network)]
    return CoverageOut(generated_at=now, live_factor=settings.live_factor,
                       targets=[r.as_dict() for r in rows], breakdown=table)


@router.get("/targets", summary="The targets catalogue")
def targets(key: Viewer, request: Request) -> list[dict[str, Any]]:
    return [{"target_id": t.target_id, "source": t.source, "clause_zh": t.clause_zh, "clause_en": t.clause_en,
             "target_zh": t.target_zh, "target_en": t.target_en, "value": t.value, "unit": t.unit,
             "deadline": t.deadline, "measure": t.measure, "city": t.city, "pilot": t.pilot,
             "network": t.network, "site_kind": t.site_kind} for t in _visible(request, key)]


@router.put("/targets/{target_id}/progress", summary="Enter the figure for a target no device measures",
            responses={404: PROBLEM, 409: PROBLEM, 422: PROBLEM})
def set_progress(key: Operator, target_id: TargetId, progress: Annotated[Progress, Body()], request: Request,
                 conn: Conn) -> dict[str, Any]:
    target = next((t for t in _visible(request, key) if t.target_id == target_id), None)
    if target is None:
        raise HTTPException(404, f"no target {target_id}")
    if target.measure != "operator":
        raise HTTPException(409, f"{target_id} is measured from devices ({target.measure}), not entered")
    with conn.transaction():
        conn.execute("""INSERT INTO target_progress (target_id, value, note) VALUES (%s, %s, %s)
                        ON CONFLICT (target_id) DO UPDATE SET value = excluded.value, note = excluded.note,
                        updated_at = now()""", (target_id, progress.value, progress.note))
        audit_write(conn, request, key, target=target_id, change=progress.model_dump(), status=200)
    return {"target_id": target_id, "value": progress.value, "as_of": date.today()}
