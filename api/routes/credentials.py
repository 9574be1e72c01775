"""A device's credentials: its CoAP token and its MQTT password.  Setting one is an admin's; each is
returned once, when set; only a salted hash is stored, and the audit log says that it changed, never
what to.  Listing them (operator: the role that provisions and decommissions devices) says which a
device has, since when, last set when and by whom (the audit row written with it), never a secret."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from api.deps import Admin, Conn, DeviceId, Operator, audit_write, device_city
from api.pagination import Page, PageQuery
from api.problems import PROBLEM
from api.routes.alarms import CityFilter, DeviceFilter, _city_in_scope
from api.schemas import city_names
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


KINDS = ("coap-token", "mqtt-password")
Kind = Literal[KINDS]  # type: ignore[valid-type]


class CredentialOut(BaseModel):
    """A credential a device has: never the secret (shown once, when set), only that it exists."""

    device_id: str
    kind: Kind = Field(description="coap-token (?t=… on CoAP) or mqtt-password (the device's broker account)")
    city: int | None = Field(description="division code of the device's site; null: no site")
    city_name_zh: str | None
    city_name_en: str | None
    created_at: datetime = Field(description="since when the device has it")
    updated_at: datetime = Field(description="when it was last set or rotated")
    set_by: str | None = Field(description="who set it last: the audit log's actor (key:<key_id>, cli:<user>); "
                                           "null when no audit row was written with it")
    set_via: str | None = Field(description="how: the route or command of that audit row")


class DeviceCredentialsOut(BaseModel):
    device_id: str
    credentials: list[CredentialOut] = Field(description="the credentials it has (none, one or both), by kind")


# The credentials with the audit row written in the same transaction (same now()) for the same device.
_CREDENTIALS = """
    WITH c AS (
        SELECT device_id, 'coap-token' AS kind, created_at, updated_at FROM device_credentials
        UNION ALL
        SELECT device_id, 'mqtt-password', created_at, updated_at FROM mqtt_accounts WHERE role = 'device')
    SELECT c.device_id, c.kind, s.city_code, c.created_at, c.updated_at, a.actor, a.route
    FROM c JOIN devices d ON d.device_id = c.device_id LEFT JOIN sites s ON s.site_id = d.site_id
    LEFT JOIN LATERAL (
        SELECT actor, route FROM audit_log l
        WHERE l.target = c.device_id AND l.at = c.updated_at
          AND CASE c.kind WHEN 'coap-token' THEN l.change ? 'coap_token'
                          ELSE l.change ? 'mqtt_password' OR l.route = 'iotjx devices mqtt-password' END
        ORDER BY l.audit_id DESC LIMIT 1) a ON true"""


def _credential(row: tuple) -> CredentialOut:
    device_id, kind, city, created_at, updated_at, actor, route = row
    return CredentialOut(device_id=device_id, kind=kind, **city_names(city), created_at=created_at,
                         updated_at=updated_at, set_by=actor, set_via=route)


@router.get("/devices/{device_id}/credentials", response_model=DeviceCredentialsOut, responses={404: PROBLEM},
            summary="Which credentials the device has, since when, set by whom (never a secret)")
def device_credentials(key: Operator, device_id: DeviceId, conn: Conn) -> DeviceCredentialsOut:
    device_city(conn, key, device_id)
    rows = conn.execute(_CREDENTIALS + " WHERE c.device_id = %s ORDER BY c.kind", (device_id,)).fetchall()
    return DeviceCredentialsOut(device_id=device_id, credentials=[_credential(r) for r in rows])


@router.get("/credentials", response_model=Page[CredentialOut], responses={403: PROBLEM, 422: PROBLEM},
            summary="The devices' credentials, by device id (never a secret)",
            description="Every CoAP token and device MQTT account, ordered by device id and kind; cursor-paginated. "
                        "A city-scoped key sees only its cities' devices (never a device without a site).")
def list_credentials(key: Operator, conn: Conn, page: PageQuery, city: CityFilter = None,
                     kind: Annotated[Kind | None, Query(description="only this kind")] = None,
                     device: DeviceFilter = None) -> Page[CredentialOut]:
    _city_in_scope(key, city)
    after = page.after(2, (str, str))
    rows = conn.execute(_CREDENTIALS + """
        WHERE (%(city)s::int IS NULL OR s.city_code = %(city)s)
          AND (%(cities)s::int[] IS NULL OR s.city_code = ANY(%(cities)s))
          AND (%(kind)s::text IS NULL OR c.kind = %(kind)s)
          AND (%(device)s::text IS NULL OR c.device_id = %(device)s)
          AND (%(a_device)s::text IS NULL OR (c.device_id, c.kind) > (%(a_device)s::text, %(a_kind)s::text))
        ORDER BY c.device_id, c.kind LIMIT %(n)s""",
        {"city": city, "cities": None if key.cities is None else list(key.cities), "kind": kind, "device": device,
         "a_device": after and after[0], "a_kind": after and after[1], "n": page.limit + 1}).fetchall()
    return page.of([_credential(r) for r in rows], key=lambda c: (c.device_id, c.kind))
