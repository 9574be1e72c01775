"""The site catalogue: import one site or a CSV of them (admin), list and read them (viewer).

A city-scoped key imports only sites of its cities (403 otherwise, also for a code already used by a
site of another city), lists only its cities' sites, and gets a 404 for another city's site (as for a
code that does not exist).  Unverified sites (named in free text by a device import, not in the
catalogue) are listed too, with `verified: false` and no `site_id`."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from api.deps import Admin, Conn, Pool, Viewer, audit_write
from api.pagination import PageQuery
from api.problems import PROBLEM
from api.csv_import import import_csv
from api.schemas import CityCode, CityName, Text
from iotjx.devices import SITE_KINDS
from iotjx.sites import (EARLIEST, LATEST, MAX_ALIASES, MAX_DISTRICT, MAX_GRADE, MAX_NAME, SITE_CODE, SiteRecord,
                         get_site, import_sites, list_sites, parse_sites_csv)

router = APIRouter(tags=["sites"])

SiteCode = Annotated[str, Path(pattern=SITE_CODE.pattern, max_length=64, examples=["JX-SS-0004"],
                               description="the catalogue's code of the site")]
SiteName = Annotated[Text, Field(min_length=1, max_length=MAX_NAME)]
# The pattern tells the OpenAPI document (and schemathesis) the years the bounds admit.
Day = Annotated[date, Field(ge=EARLIEST, le=LATEST, description=f"{EARLIEST} … {LATEST}",
                            json_schema_extra={"pattern": r"^(20[0-9]{2}|2100)-[0-9]{2}-[0-9]{2}$"})] | None


class SiteIn(BaseModel):
    site_id: str = Field(pattern=SITE_CODE.pattern, max_length=64, examples=["JX-SS-0004"])
    city: CityName = Field(examples=["360600", "Yingtan", "鹰潭"], description="division code or name")  # type: ignore[valid-type]
    kind: Literal[SITE_KINDS] = Field(examples=["scenic_spot"])  # type: ignore[valid-type]
    name: SiteName = Field(examples=["龙虎山风景名胜区"])
    aliases: list[SiteName] = Field([], max_length=MAX_ALIASES, examples=[["龙虎山", "Longhushan"]])
    grade: Annotated[Text, Field(max_length=MAX_GRADE)] | None = Field(None, examples=["5A"],
                                                                       description="1A..5A for a scenic spot")
    model_site: bool = False
    model_site_since: Day = None
    status: Literal["active", "closed"] | None = Field(None, description="empty: closed when closed_on is given")
    opened_on: Day = None
    closed_on: Day = None
    district: Annotated[Text, Field(min_length=1, max_length=MAX_DISTRICT)] | None = Field(
        None, examples=["360681", "贵溪市"],
        description="county-level division (区/县) within the site's city: GB/T 2260 code or its name")

    def record(self) -> SiteRecord:
        return SiteRecord(site_id=self.site_id, city=self.city, kind=self.kind, name=self.name,
                          aliases=tuple(self.aliases), grade=self.grade or None, model_site=self.model_site,
                          model_site_since=self.model_site_since,
                          status=self.status or ("closed" if self.closed_on else "active"),
                          opened_on=self.opened_on, closed_on=self.closed_on, district=self.district)


class SiteImportResult(BaseModel):
    created: int
    updated: int
    merged_unverified: int = Field(description="unverified sites that became (part of) a catalogue site")
    devices_moved: int = Field(description="devices re-pointed from those sites")


class DeviceCounts(BaseModel):
    active: int
    inactive: int


class SiteOut(BaseModel):
    site_id: str | None = Field(description="the catalogue code; null for an unverified site")
    verified: bool
    city: int
    kind: str
    name: str
    aliases: list[str]
    grade: str | None
    model_site: bool
    model_site_since: date | None
    status: str
    opened_on: date | None
    closed_on: date | None
    district_code: int | None = Field(description="county-level division (GB/T 2260); null: not known")
    district_name_zh: str | None
    district_name_en: str | None
    devices: DeviceCounts


class SiteList(BaseModel):
    """One page of sites (cursor pagination), and how many match in all."""

    total: int
    items: list[SiteOut]
    next_cursor: str | None


@router.post("/sites", status_code=201, response_model=SiteImportResult, summary="Create or update one catalogue site",
             responses={403: PROBLEM, 422: PROBLEM})
def import_one(key: Admin, site: SiteIn, request: Request, conn: Conn) -> SiteImportResult:
    with conn.transaction():
        result = import_sites(conn, [site.record()], cities=key.cities)
        audit_write(conn, request, key, target=site.site_id, change={**site.model_dump(mode="json"), **result},
                    status=201)
    return SiteImportResult(**result)


@router.post("/sites/bulk", response_model=SiteImportResult, summary="Import the site catalogue from CSV (all or nothing)",
             description="Columns site_id, city, kind, name (+ optional aliases separated by `|`, grade, model_site, "
                         "model_site_since, status, opened_on, closed_on, district — a GB/T 2260 code or the "
                         "district's name within the site's city). Errors name their CSV line; the first 100 are "
                         "listed and `errors_total` counts them all. The body is limited by IOTJX_API_MAX_IMPORT_BYTES.",
             responses={403: PROBLEM, 413: PROBLEM, 415: PROBLEM, 422: PROBLEM},
             openapi_extra={"requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"},
                 "example": "site_id,city,kind,name,aliases,grade\n"
                            "JX-SS-0004,Yingtan,scenic_spot,龙虎山风景名胜区,龙虎山|Longhushan,5A\n"}}}})
async def import_bulk(key: Admin, request: Request, pool: Pool) -> SiteImportResult:
    return SiteImportResult(**await import_csv(request, key, pool, parse=parse_sites_csv, apply=import_sites,
                                               noun="sites"))


def _site(row: dict) -> SiteOut:
    return SiteOut(**{k: v for k, v in row.items() if k != "sort_key"},
                   devices=DeviceCounts(active=row["active"], inactive=row["inactive"]))


@router.get("/sites", response_model=SiteList, summary="Catalogue and unverified sites, with their device counts",
            responses={403: PROBLEM})
def read_sites(key: Viewer, conn: Conn, page: PageQuery,
               city: Annotated[CityCode | None, Query(description="division code, e.g. 360600")] = None,
               kind: Annotated[Literal[SITE_KINDS] | None, Query()] = None,  # type: ignore[valid-type]
               verified: Annotated[bool | None, Query(description="true: catalogue sites; false: unverified")] = None,
               status: Annotated[Literal["active", "closed"] | None, Query()] = None) -> SiteList:
    if city is not None and not key.sees_city(city):
        raise HTTPException(403, f"city {city} is outside this key's cities")
    total, rows = list_sites(conn, city=city, cities=key.cities, kind=kind, verified=verified, status=status,
                             limit=page.limit + 1, after=page.after(6, (int, str, int, str, str, int)))
    got = page.of(rows, key=lambda r: r["sort_key"])
    return SiteList(total=total, items=[_site(r) for r in got.items], next_cursor=got.next_cursor)


@router.get("/sites/{site_id}", response_model=SiteOut, summary="One catalogue site", responses={404: PROBLEM})
def read_site(key: Viewer, site_id: SiteCode, conn: Conn) -> SiteOut:
    row = get_site(conn, site_id)
    if row is None or not key.sees_city(row["city"]):
        raise HTTPException(404, f"no site {site_id}")
    return _site(row)
