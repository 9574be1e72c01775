"""Rejected uplinks: the list (newest first, filtered, within the key's cities) and the re-decode that
stores what a codec or registry fix now accepts, exactly once (ingest/redecode.py), as a background
job (api/jobs.py, followed at /jobs/{job_id}).

City scope: a reject belongs to the city of the site its device is registered at now; a reject of an
unknown device (or of a device without a site) is seen only by a key without a city scope."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field, model_validator

import decoders
from api import jobs
from api.deps import Admin, Conn, RowId, Viewer, audit_write
from api.pagination import Page, PageQuery, newest_first
from api.routes.alarms import aware, time_window
from api.routes.jobs import JobOut, job_out
from api.problems import PROBLEM, problem
from api.schemas import clean_text
from ingest.redecode import RejectFilter, filter_sql
from ingest.rejects import GATEWAY_REASONS
from iotjx.model import TRANSPORTS

router = APIRouter(tags=["rejects"])

REASONS = tuple(sorted({r for r in decoders.REASONS if r != "ok"} | set(GATEWAY_REASONS)))
Reason = Literal[REASONS]  # type: ignore[valid-type]
Transport = Literal[TRANSPORTS]  # type: ignore[valid-type]
MAX_HEX_BYTES = 1024                     # payload_hex shows at most this many bytes of a reject
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
# A reject's device id is what the transport named (an MQTT topic's id may be anything printable).
AnyDevice = Annotated[str, AfterValidator(clean_text), Field(min_length=1, max_length=200,
                                                             pattern=r"^[^\x00-\x1f\x7f]*$")]


class RejectOut(BaseModel):
    reject_id: int
    received_at: datetime
    device_id: str
    transport: str
    codec: str | None = Field(description="the codec that refused it; null: it never reached one (unknown device…)")
    reason: str
    detail: str
    city: int | None = Field(description="division code of the device's site now; null: unknown device or no site")
    model: str | None = Field(description="the device's model now; null: not registered")
    payload_bytes: int = Field(description="length of the bytes kept (a too_large reject keeps its first KiB)")
    payload_hex: str = Field(description=f"the kept bytes as hex, at most the first {MAX_HEX_BYTES}")
    payload_truncated: bool = Field(description=f"true when payload_hex shows only the first {MAX_HEX_BYTES} bytes")
    redecoded_at: datetime | None = Field(description="when a re-decode stored it; null: still a reject")
    redecoded_by: str | None


_SELECT = f"""
    SELECT r.reject_id, r.received_at, r.device_id, r.transport, r.codec, r.reason, r.detail, s.city_code, d.model,
           octet_length(r.payload), substring(r.payload FROM 1 FOR {MAX_HEX_BYTES}), r.redecoded_at, r.redecoded_by
    FROM rejected_uplinks r LEFT JOIN devices d ON d.device_id = r.device_id LEFT JOIN sites s ON s.site_id = d.site_id"""


def _out(row: tuple) -> RejectOut:
    (reject_id, received_at, device_id, transport, codec, reason, detail, city, model, size, head, redecoded_at,
     redecoded_by) = row
    return RejectOut(reject_id=reject_id, received_at=received_at, device_id=device_id, transport=transport,
                     codec=codec, reason=reason, detail=detail, city=city, model=model, payload_bytes=size,
                     payload_hex=bytes(head).hex(), payload_truncated=size > MAX_HEX_BYTES,
                     redecoded_at=redecoded_at, redecoded_by=redecoded_by)


Since = Annotated[datetime | None, Query(description="received at or after (ISO 8601; without a zone: UTC)")]
Until = Annotated[datetime | None, Query(description="received before")]


@router.get("/rejects", response_model=Page[RejectOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="Rejected uplinks, newest first",
            description="Uplinks the gateway could not store, with the reason and the decoder's detail, received "
                        "newest first; cursor-paginated. A city-scoped key sees only rejects of devices registered at "
                        "its cities' sites (never an unknown device's).")
def list_rejects(key: Viewer, conn: Conn, page: PageQuery,
                 reason: Annotated[Reason | None, Query(description="reject reason")] = None,
                 device: Annotated[AnyDevice | None, Query(description="the device id the uplink named")] = None,
                 transport: Annotated[Transport | None, Query()] = None,
                 codec: Annotated[str | None, Query(pattern=NAME, max_length=64)] = None,
                 model: Annotated[str | None, Query(pattern=NAME, max_length=64,
                                                    description="the device's model now")] = None,
                 redecoded: Annotated[bool | None, Query(description="true: stored since by a re-decode; "
                                                                     "false: still rejects")] = None,
                 since: Since = None, until: Until = None) -> Page[RejectOut]:
    since, until = time_window(since, until)
    tail, keyset = newest_first(page, "r.received_at", "r.reject_id")
    where, params = filter_sql(RejectFilter(reason, device, transport, codec, model, since, until, redecoded),
                               key.cities)
    rows = conn.execute(_SELECT + f" WHERE {where}" + tail, {**params, **keyset}).fetchall()
    return page.of([_out(r) for r in rows], key=lambda r: (r.received_at, r.reject_id))


@router.get("/rejects/{reject_id}", response_model=RejectOut, responses={404: PROBLEM},
            summary="One rejected uplink")
def get_reject(key: Viewer, reject_id: RowId, conn: Conn) -> RejectOut:
    row = conn.execute(_SELECT + " WHERE r.reject_id = %s", (reject_id,)).fetchone()
    if row is None or not (key.cities is None or (row[7] is not None and key.sees_city(row[7]))):
        raise HTTPException(404, f"no reject {reject_id}")
    return _out(row)


class RedecodeIn(BaseModel):
    """Which rejects to re-decode (every given field must match; none given: every reject in scope)."""

    device: AnyDevice | None = None
    model: str | None = Field(None, pattern=NAME, max_length=64, description="the device's model now")
    codec: str | None = Field(None, pattern=NAME, max_length=64, description="the codec that refused it")
    reason: Reason | None = None
    transport: Transport | None = None
    since: datetime | None = Field(None, description="received at or after (without a zone: UTC)")
    until: datetime | None = Field(None, description="received before")

    @model_validator(mode="after")
    def _times(self) -> RedecodeIn:
        self.since, self.until = aware(self.since), aware(self.until)
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError("until must be after since")
        return self


@router.post("/rejects/redecode", status_code=202, response_model=JobOut,
             responses={202: {"headers": {"Location": {"description": "the job: /jobs/{job_id}",
                                                       "schema": {"type": "string"}}}},
                        403: PROBLEM, 409: PROBLEM, 422: PROBLEM},
             summary="Re-decode rejects after a codec, model or registry fix, as a background job; "
                     "stores each frame exactly once",
             description="Queues a job (202, Location: /jobs/{job_id}; follow it with GET /jobs/{job_id}) that runs "
                         "the kept bytes of the matching rejects through today's registry and codecs, the write path "
                         "of a live uplink, at their original receive time. A reject that now decodes is marked "
                         "(redecoded_at/by) in the transaction that stores its rows, so a second run stores nothing "
                         "again. The reject rows and the raw log keep what happened on arrival. Admin: it writes "
                         "history (readings, rollups) after a change only an admin makes; a city-scoped admin "
                         "re-decodes its cities' devices only. One re-decode at a time per city: while a queued or "
                         "running one covers any of the key's cities (a whole-province one covers all), the answer is "
                         "409 with that job's id in `job_id`.")
def post_redecode(key: Admin, body: RedecodeIn, request: Request, conn: Conn) -> JSONResponse:
    params = body.model_dump(mode="json", exclude_none=True)
    try:
        with conn.transaction():
            job_id = jobs.submit(conn, "redecode", params, cities=key.cities, actor=key.actor, key_id=key.key_id)
            audit_write(conn, request, key, target=str(job_id), status=202, change={"filter": params, "job_id": job_id})
    except jobs.JobConflict as exc:
        return problem(409, "Conflict", f"{exc}; follow it with GET /jobs/{exc.job_id}", job_id=exc.job_id)
    runner = getattr(request.app.state, "jobs", None)
    if runner is not None:
        runner.wake()
    job = job_out(conn, job_id)
    return JSONResponse(job.model_dump(mode="json"), status_code=202, headers={"Location": f"/jobs/{job_id}"})
