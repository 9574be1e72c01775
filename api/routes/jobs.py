"""Background jobs (api/jobs.py): a re-decode started by `POST /rejects/redecode` is followed here —
its state, counts, who started it, when, and the error of a failed one.

Admin, like starting one.  A city-scoped key sees only the jobs started with a scope inside its cities
(never a whole-province job); another's is a 404."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import psycopg
from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from api.deps import Admin, Conn, RowId
from api.jobs import KINDS, STATES
from api.pagination import Page, PageQuery, newest_first
from api.problems import PROBLEM
from api.schemas import city_names

router = APIRouter(tags=["jobs"])

State = Literal[STATES]  # type: ignore[valid-type]
Kind = Literal[KINDS]  # type: ignore[valid-type]


class JobFilter(BaseModel):
    """What the job was asked to do: a re-decode's filter (absent fields: any)."""

    device: str | None = None
    model: str | None = None
    codec: str | None = None
    reason: str | None = None
    transport: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class ReasonCount(BaseModel):
    reason: str
    count: int


class JobCity(BaseModel):
    city: int
    city_name_zh: str | None
    city_name_en: str | None


class JobOut(BaseModel):
    job_id: int
    kind: Kind
    state: State = Field(description="queued → running → done, or failed (with `error`)")
    params: JobFilter
    cities: list[JobCity] | None = Field(description="the starting key's cities; null: the whole province")
    started_by: str = Field(description="key:<key_id> of the key that posted it (as the audit log names it)")
    created_at: datetime
    started_at: datetime | None = Field(description="when a runner took it; null: still queued")
    finished_at: datetime | None
    examined: int = Field(description="rejects not stored yet that matched and were read, so far")
    stored: int = Field(description="of which stored (readings, rollups, liveness as for a live uplink)")
    still_rejected: list[ReasonCount] = Field(description="the others, by today's reason (too_large: not retried)")
    still_rejected_total: int
    last_reject_id: int | None = Field(description="the last reject examined")
    error: str | None = Field(description="why it failed; null unless state is failed")


_SELECT = """SELECT job_id, kind, state, params, cities, actor, created_at, started_at, finished_at, examined, stored,
                    still_rejected, last_reject_id, error FROM jobs j"""
# A key sees a job started within its cities (a whole-province key sees every job).
_VISIBLE = "(%(k_cities)s::int[] IS NULL OR (j.cities IS NOT NULL AND j.cities <@ %(k_cities)s))"


def _out(row: tuple) -> JobOut:
    (job_id, kind, state, params, cities, actor, created_at, started_at, finished_at, examined, stored, still,
     last_reject_id, error) = row
    return JobOut(job_id=job_id, kind=kind, state=state, params=JobFilter.model_validate(params or {}),
                  cities=None if cities is None else [JobCity(**{**city_names(c), "city": c}) for c in cities],
                  started_by=actor, created_at=created_at, started_at=started_at, finished_at=finished_at,
                  examined=examined, stored=stored,
                  still_rejected=[ReasonCount(reason=k, count=v) for k, v in sorted((still or {}).items())],
                  still_rejected_total=sum((still or {}).values()), last_reject_id=last_reject_id, error=error)


def job_out(conn: psycopg.Connection, job_id: int) -> JobOut:
    """One job as the API shows it (whatever the key: the caller checks who may see it)."""
    row = conn.execute(_SELECT + " WHERE job_id = %s", (job_id,)).fetchone()
    if row is None:
        raise HTTPException(404, f"no job {job_id}")
    return _out(row)


@router.get("/jobs", response_model=Page[JobOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Background jobs (re-decodes), newest first",
            description="Cursor-paginated, newest first. A city-scoped key sees only the jobs started within its "
                        "cities.")
def list_jobs(key: Admin, conn: Conn, page: PageQuery,
              state: Annotated[State | None, Query(description="only jobs in this state")] = None,
              kind: Annotated[Kind | None, Query(description="only jobs of this kind")] = None) -> Page[JobOut]:
    tail, keyset = newest_first(page, "j.created_at", "j.job_id")
    rows = conn.execute(_SELECT + f""" WHERE {_VISIBLE} AND (%(state)s::text IS NULL OR j.state = %(state)s)
                                      AND (%(kind)s::text IS NULL OR j.kind = %(kind)s)""" + tail,
                        {"k_cities": None if key.cities is None else list(key.cities), "state": state, "kind": kind,
                         **keyset}).fetchall()
    return page.of([_out(r) for r in rows], key=lambda j: (j.created_at, j.job_id))


@router.get("/jobs/{job_id}", response_model=JobOut, responses={403: PROBLEM, 404: PROBLEM},
            summary="One background job: state, counts, who, when, error")
def get_job(key: Admin, job_id: RowId, conn: Conn) -> JobOut:
    row = conn.execute(_SELECT + f" WHERE j.job_id = %(id)s AND {_VISIBLE}",
                       {"id": job_id, "k_cities": None if key.cities is None else list(key.cities)}).fetchone()
    if row is None:
        raise HTTPException(404, f"no job {job_id}")
    return _out(row)
