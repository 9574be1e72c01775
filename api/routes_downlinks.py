"""Downlinks for sleeping devices, and devices' CoAP tokens.  Mounted by `api/app.py` with
``app.include_router(routes_downlinks.router)``; uses the app's pool (``app.state.pool``)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from api.problems import PROBLEM
from ingest.coap import TOKEN_PATTERN, set_device_token
from ingest.downlink import KINDS, DownlinkError, get_downlink, list_downlinks, queue_downlink
from iotjx.settings import Settings

router = APIRouter(tags=["downlinks"])

Status = Literal["queued", "sent", "acknowledged", "expired"]


class DownlinkIn(BaseModel):
    kind: Literal["valve_close", "valve_open", "set_interval", "raw"] = Field(
        description="valve_close / valve_open (CJ/T 188 A017, JSON, SenML), set_interval (JSON, SenML), raw")
    params: dict[str, Any] = Field(default_factory=dict,
                                   examples=[{"interval_s": 3600}, {"meter_address": "78330123456789"}],
                                   description="set_interval: interval_s; CJ/T 188 valves: meter_address, serial")
    payload_hex: str | None = Field(None, pattern=r"^([0-9A-Fa-f]{2})+$",
                                    description="the command's bytes, for codecs without an encoder or kind raw")
    payload_base64: str | None = Field(None, pattern=r"^[A-Za-z0-9+/]+={0,2}$")
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


class TokenIn(BaseModel):
    token: str | None = Field(None, pattern=TOKEN_PATTERN.pattern,
                              description="16-128 URI-safe characters; omitted: one is generated")


class TokenOut(BaseModel):
    device_id: str
    token: str = Field(description="shown once: only a salted hash is stored")


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
def post_downlink(device_id: str, body: DownlinkIn, request: Request) -> DownlinkOut:
    settings = getattr(request.app.state, "settings", None)
    default_ttl = settings.downlink_ttl_s if settings is not None else Settings.model_fields["downlink_ttl_s"].default
    ttl = body.ttl_s or default_ttl
    raw = _raw(body)
    with request.app.state.pool.connection() as conn:
        try:
            row = queue_downlink(conn, device_id, body.kind, body.params, raw, ttl)
        except DownlinkError as exc:
            raise HTTPException(exc.status, str(exc)) from None
    return _out(row)


@router.get("/devices/{device_id}/downlinks", response_model=list[DownlinkOut],
            summary="A device's commands, newest first")
def get_device_downlinks(device_id: str, request: Request, status: Status | None = None,
                         limit: int = Query(100, ge=1, le=1000)) -> list[DownlinkOut]:
    with request.app.state.pool.connection() as conn:
        return [_out(r) for r in list_downlinks(conn, device_id, status, limit)]


@router.get("/downlinks/{downlink_id}", response_model=DownlinkOut, summary="One command and its status",
            responses={404: PROBLEM})
def get_one_downlink(downlink_id: int, request: Request) -> DownlinkOut:
    with request.app.state.pool.connection() as conn:
        row = get_downlink(conn, downlink_id)
    if row is None:
        raise HTTPException(404, f"no downlink {downlink_id}")
    return _out(row)


@router.put("/devices/{device_id}/coap-token", response_model=TokenOut, responses={404: PROBLEM, 422: PROBLEM},
            summary="Set or rotate the device's CoAP token (?t=…); the answer is the only time it is shown")
def put_coap_token(device_id: str, body: TokenIn, request: Request) -> TokenOut:
    with request.app.state.pool.connection() as conn:
        try:
            token = set_device_token(conn, device_id, body.token)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
    return TokenOut(device_id=device_id, token=token)


__all__ = ["KINDS", "router"]
