"""API keys through the API (admin): list, make (the key is in the answer, once), revoke.

A city-scoped admin sees and revokes only keys within its cities, and makes only such keys."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field

from api.deps import Admin, Conn, KeyId, audit_write
from api.pagination import Page, PageQuery
from api.problems import PROBLEM
from api.schemas import CityCode, CityName, Text
from iotjx.apikeys import ROLES, create_key, list_keys, revoke_key

router = APIRouter(tags=["keys"])


class KeyIn(BaseModel):
    role: Literal[ROLES]  # type: ignore[valid-type]
    cities: list[CityName | CityCode] | None = Field(  # type: ignore[valid-type]
        None, min_length=1, max_length=11, description="division codes or names; omitted: every city")
    name: Text = Field("", max_length=200, description="what the key is for")


class KeyOut(BaseModel):
    key_id: str
    name: str
    role: str
    cities: list[int] | None
    created_at: datetime | None
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None


class NewKeyOut(KeyOut):
    key: str = Field(description="the whole key, shown this once: send it as `Authorization: Bearer KEY`")


@router.get("/keys", response_model=Page[KeyOut], summary="Every key (without secrets), revoked ones too (cursor pages)")
def get_keys(key: Admin, conn: Conn, page: PageQuery) -> Page[KeyOut]:
    after = page.after(2, (datetime, str))
    keys = list_keys(conn, within=key if key.cities is not None else None, after=after, limit=page.limit + 1)
    return page.of([KeyOut(**k.as_dict()) for k in keys], key=lambda k: (k.created_at, k.key_id))


@router.post("/keys", status_code=201, response_model=NewKeyOut, responses={403: PROBLEM, 422: PROBLEM},
             summary="Make a key; the answer is the only time the key is shown")
def post_key(key: Admin, body: KeyIn, request: Request, conn: Conn) -> NewKeyOut:
    with conn.transaction():
        made, secret = create_key(conn, body.role, body.cities, name=body.name, created_by=key.actor, grantor=key)
        audit_write(conn, request, key, target=made.key_id,
                    change={"role": made.role, "cities": made.cities, "name": made.name}, status=201)
    return NewKeyOut(**made.as_dict(), key=secret)


@router.delete("/keys/{key_id}", status_code=204, response_class=Response, responses={404: PROBLEM},
               summary="Revoke a key: refused from its next request on")
def delete_key(key: Admin, key_id: KeyId, request: Request, conn: Conn) -> Response:
    with conn.transaction():
        revoked = revoke_key(conn, key_id, within=key if key.cities is not None else None)
        if revoked is None:
            raise HTTPException(404, f"no active key {key_id}")
        audit_write(conn, request, key, target=key_id, change={"revoked_at": revoked.revoked_at}, status=204)
    return Response(status_code=204)
