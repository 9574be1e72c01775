"""The eleven cities (prefecture-level divisions) of Jiangxi, with their devices counted by status (viewer).

A city-scoped key lists only its cities.  A device counts in the city of its site (devices without a
site are in no city)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from api.deps import Conn, Viewer
from api.pagination import Page, PageQuery
from api.problems import PROBLEM

router = APIRouter(tags=["cities"])


class CityDevices(BaseModel):
    active: int
    inactive: int
    retired: int


class CityOut(BaseModel):
    city: int = Field(description="the division code, e.g. 360600 (the `city` of every other route)")
    name_zh: str = Field(examples=["鹰潭"])
    name_en: str = Field(examples=["Yingtan"])
    devices: CityDevices


@router.get("/cities", response_model=Page[CityOut], summary="The cities, with their devices by status",
            description="By division code; a city-scoped key gets only its cities. Paginated by cursor like every "
                        "list (the eleven fit one page at the default limit).",
            responses={422: PROBLEM})
def list_cities(key: Viewer, conn: Conn, page: PageQuery) -> Page[CityOut]:
    after = page.after(1)[0] if page.cursor is not None else None
    if after is not None and (not isinstance(after, int) or isinstance(after, bool)):
        raise HTTPException(422, "cursor: not a cursor of this list (pass next_cursor of the previous page as is)")
    rows = conn.execute("""
        SELECT c.code, c.name_zh, c.name_en,
               count(d.device_id) FILTER (WHERE d.status = 'active'),
               count(d.device_id) FILTER (WHERE d.status = 'inactive'),
               count(d.device_id) FILTER (WHERE d.status = 'retired')
        FROM cities c LEFT JOIN sites s ON s.city_code = c.code LEFT JOIN devices d ON d.site_id = s.site_id
        WHERE (%(scope)s::int[] IS NULL OR c.code = ANY(%(scope)s::int[]))
          AND (%(after)s::int IS NULL OR c.code > %(after)s::int)
        GROUP BY c.code ORDER BY c.code LIMIT %(limit)s""",
        {"scope": list(key.cities) if key.cities is not None else None, "after": after,
         "limit": page.limit + 1}).fetchall()
    return page.of([CityOut(city=c, name_zh=zh, name_en=en, devices=CityDevices(active=a, inactive=i, retired=r))
                    for c, zh, en, a, i, r in rows], key=lambda city: (city.city,))
