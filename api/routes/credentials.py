"""A device's credentials (admin): its CoAP token and its MQTT password.  Each is returned once,
when set; only a salted hash is stored, and the audit log says that it changed, never what to."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field

from api.deps import Admin, Conn, DeviceId, audit_write, device_city
from api.problems import PROBLEM
from ingest.coap import TOKEN_PATTERN, set_device_token
from iotjx.mqtt_accounts import PASSWORD, set_device_password

router = APIRouter(tags=["credentials"])


class TokenIn(BaseModel):
    token: str | None = Field(None, pattern=TOKEN_PATTERN.pattern,
                              description="16-128 URI-safe characters; omitted: one is generated")


class TokenOut(BaseModel):
    device_id: str
    token: str = Field(description="shown once: only a salted hash is stored")


class PasswordIn(BaseModel):
    password: str | None = Field(None, pattern=PASSWORD.pattern,
                                 description="16-128 printable ASCII characters without spaces; omitted: generated")


class PasswordOut(BaseModel):
    device_id: str
    username: str = Field(description="the device's MQTT user name: its device id")
    password: str = Field(description="shown once: only a salted PBKDF2 hash is stored")


@router.put("/devices/{device_id}/coap-token", response_model=TokenOut, responses={404: PROBLEM, 422: PROBLEM},
            summary="Set or rotate the device's CoAP token (?t=…); the answer is the only time it is shown")
def put_coap_token(key: Admin, device_id: DeviceId, body: TokenIn, request: Request, conn: Conn) -> TokenOut:
    with conn.transaction():
        device_city(conn, key, device_id, lock=True)
        token = set_device_token(conn, device_id, body.token)
        audit_write(conn, request, key, target=device_id,
                    change={"coap_token": "generated" if body.token is None else "given"}, status=200)
    return TokenOut(device_id=device_id, token=token)


@router.put("/devices/{device_id}/mqtt-password", response_model=PasswordOut,
            responses={404: PROBLEM, 409: PROBLEM, 422: PROBLEM},
            summary="Set or rotate the device's MQTT password; the answer is the only time it is shown")
def put_mqtt_password(key: Admin, device_id: DeviceId, body: PasswordIn, request: Request, conn: Conn) -> PasswordOut:
    with conn.transaction():
        device_city(conn, key, device_id, lock=True)
        # A service account (gateway, tester) of the same name must not be turned into this device's.
        taken = conn.execute("SELECT role FROM mqtt_accounts WHERE username = %s AND role <> 'device'",
                             (device_id,)).fetchone()
        if taken is not None:
            raise HTTPException(409, f"the MQTT user name {device_id} is a {taken[0]} account")
        try:
            password = set_device_password(conn, device_id, body.password)
        except ValueError as exc:            # an id Mosquitto cannot take as a user name (':' in it)
            raise HTTPException(422, str(exc)) from None
        audit_write(conn, request, key, target=device_id,
                    change={"mqtt_password": "generated" if body.password is None else "given"}, status=200)
    return PasswordOut(device_id=device_id, username=device_id, password=password)


@router.delete("/devices/{device_id}/mqtt-password", status_code=204, response_class=Response,
               responses={404: PROBLEM}, summary="Remove the device's MQTT account (the broker refuses it)")
def delete_mqtt_password(key: Admin, device_id: DeviceId, request: Request, conn: Conn) -> Response:
    with conn.transaction():
        device_city(conn, key, device_id, lock=True)
        if conn.execute("DELETE FROM mqtt_accounts WHERE device_id = %s", (device_id,)).rowcount == 0:
            raise HTTPException(404, f"device {device_id} has no MQTT account")
        audit_write(conn, request, key, target=device_id, change={"mqtt_password": "removed"}, status=204)
    return Response(status_code=204)
