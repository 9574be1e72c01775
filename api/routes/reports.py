"""`GET /reports/coverage`: the coverage report as a self-contained HTML page (analytics/report_html.py).

The page is drawn from the answer `/coverage` gives the same key with the same query (the route function
is called as is): the same figures, the same city scope.  Radio by city is `radio_summary` over the last
days to now, limited to the key's cities."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from analytics.report_html import RADIO_DAYS, coverage_page, radio_for_page
from api.deps import AppSettings, Conn, Viewer
from api.problems import PROBLEM
from api.routes.coverage import coverage
from api.schemas import CityCode, city_names

router = APIRouter(tags=["coverage"])


@router.get("/reports/coverage", response_class=HTMLResponse,
            responses={200: {"content": {"text/html": {}}, "description": "the report, one HTML page"},
                       403: PROBLEM, 404: PROBLEM, 422: PROBLEM},
            summary="The coverage report as one printable HTML page (charts inline, no script)",
            description="The figures of `/coverage` with the same query (plan targets and verdicts, programme "
                        "targets with history charts and pace, a chart per city) and radio coverage by city over "
                        f"the last {RADIO_DAYS} days; a city-scoped key sees its cities only.")
def coverage_report(key: Viewer, request: Request, conn: Conn, settings: AppSettings,
                    city: Annotated[CityCode | None, Query(description="division code, e.g. 360600")] = None,
                    pilot: Literal["water", "fire", "traffic"] | None = None,
                    network: Literal["nbiot", "cat1"] | None = None,
                    as_of: Annotated[date | None, Query(description="a past local day, e.g. 2022-12-31")] = None,
                    history_days: Annotated[int, Query(ge=0, le=3660, description="days of daily values per target")] = 30,
                    ) -> HTMLResponse:
    doc = coverage(key, request, conn, settings, city=city, pilot=pilot, network=network, as_of=as_of,
                   history_days=history_days).model_dump(mode="json")
    radio, note = radio_for_page(conn, settings,
                                 lambda c: (key.cities is None and city is None) if c is None
                                 else key.sees_city(c) and city in (None, c))
    if city is not None:
        names = city_names(city)
        scope = f"{names['city_name_zh']} {names['city_name_en']}"
    else:
        scope = "the whole province" if key.cities is None else "this key's cities: " + ", ".join(
            str(city_names(c)["city_name_en"]) for c in key.cities)
    scope += "".join(f", {k} {v}" for k, v in (("pilot", pilot), ("network", network)) if v)
    return HTMLResponse(coverage_page(doc, radio, radio_note=note, scope=scope))
