"""Downlinks for sleeping devices: queued by an operator, read by a viewer, within the key's cities."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from api.deps import AppSettings, Conn, DeviceId, Operator, RowId, Viewer, audit_write, device_city
from api.pagination import Page, PageQuery
from api.problems import PROBLEM
from api.schemas import JsonParams
from ingest.downlink import KINDS, MAX_PAYLOAD, DownlinkError, get_downlink, list_downlinks, queue_downlink

router = APIRouter(tags=["downlinks"])

Status = Literal["queued", "sent", "acknowledged", "expired"]


class DownlinkIn(BaseModel):
    kind: Literal[KINDS] = Field(  # type: ignore[valid-type]
        description="valve_close / valve_open (CJ/T 188 A017, JSON, SenML), set_interval (JSON, SenML), raw")
    params: JsonParams = Field(default_factory=dict,
                               examples=[{"interval_s": 3600}, {"meter_address": "78330123456789"}],
                               description="set_interval: interval_s; CJ/T 188 valves: meter_address, serial")
    payload_hex: str | None = Field(None, pattern=r"^([0-9A-Fa-f]{2})+$", max_length=2 * MAX_PAYLOAD,
                                    description="the command's bytes, for codecs without an encoder or kind raw")
    payload_base64: str | None = Field(None, pattern=r"^[A-Za-z0-9+/]+={0,2}$", max_length=4 * MAX_PAYLOAD // 3 + 4)
    ttl_s: int | None = Field(None, ge=60, le=90 * 86400, description="expires after; default IOTJX_DOWNLINK_TTL_S")


class DownlinkOut(BaseModel):
    id: int
    device_id: str
    kind: str
    params: dict[str, Any]
    payload_hex: str
    status: Status
    transport: str | None
    attempts: int
    created_at: datetime
    sent_at: datetime | None
    acked_at: datetime | None
    expires_at: datetime


def _out(row: dict[str, Any]) -> DownlinkOut:
    row = dict(row)
    row["payload_hex"] = row.pop("payload").hex()
    return DownlinkOut(**row)


def _raw(body: DownlinkIn) -> bytes | None:
    try:
        if body.payload_hex is not None:
            return bytes.fromhex(body.payload_hex)
        if body.payload_base64 is not None:
            return base64.b64decode(body.payload_base64, validate=True)
    except (ValueError, binascii.Error):
        raise HTTPException(422, "payload_hex / payload_base64 do not decode") from None
    return None


@router.post("/devices/{device_id}/downlinks", status_code=201, response_model=DownlinkOut,
             responses={404: PROBLEM, 409: PROBLEM, 422: PROBLEM},
             summary="Queue a command; delivered on the device's next uplink (CoAP response or MQTT)")
def post_downlink(key: Operator, device_id: DeviceId, body: DownlinkIn, request: Request, conn: Conn,
                  settings: AppSettings) -> DownlinkOut:
    ttl = body.ttl_s or settings.downlink_ttl_s
    raw = _raw(body)
    with conn.transaction():
        device_city(conn, key, device_id, lock=True)
        try:
            row = queue_downlink(conn, device_id, body.kind, body.params, raw, ttl)
        except DownlinkError:
            raise                          # rendered with its own status by api.problems
        except (ValueError, TypeError) as exc:     # e.g. int("x") for a CJ/T 188 serial
            raise HTTPException(422, f"params do not make a {body.kind} command: {exc}") from None
        audit_write(conn, request, key, target=device_id,
                    change={"downlink_id": row["id"], "kind": body.kind, "params": body.params,
                            "payload_hex": row["payload"].hex(), "ttl_s": ttl}, status=201)
    return _out(row)


@router.get("/devices/{device_id}/downlinks", response_model=Page[DownlinkOut], responses={404: PROBLEM},
            summary="A device's commands, newest first (cursor pages)")
def get_device_downlinks(key: Viewer, device_id: DeviceId, conn: Conn, page: PageQuery,
                         status: Status | None = None) -> Page[DownlinkOut]:
    device_city(conn, key, device_id)
    after = page.after(1, (int,))
    rows = list_downlinks(conn, device_id, status, page.limit + 1, before_id=after and after[0])
    return page.of([_out(r) for r in rows], key=lambda d: (d.id,))


@router.get("/downlinks/{downlink_id}", response_model=DownlinkOut, summary="One command and its status",
            responses={404: PROBLEM})
def get_one_downlink(key: Viewer, downlink_id: RowId, conn: Conn) -> DownlinkOut:
    row = get_downlink(conn, downlink_id)
    if row is None:
        raise HTTPException(404, f"no downlink {downlink_id}")
    try:
        device_city(conn, key, row["device_id"])
    except HTTPException:
        raise HTTPException(404, f"no downlink {downlink_id}") from None
    return _out(row)
