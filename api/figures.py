"""What the figure routes (api/routes/water.py, fire.py, traffic.py, radio.py, health.py) share: the
cities a key's call covers, bounded windows, keyset pages over a computed list, and CSV twins.

A figure is computed by its analytics function (one definition, README): the routes only choose the
cities, bound the window and shape the answer.  An analytics function takes one city or all, so a key
scoped to several cities gets the function run once per city of its scope and the rows put together;
rows of devices without a site (city 0) are seen only by a key without a scope, as everywhere else."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, timedelta
from typing import Annotated, Any, TypeVar

import psycopg
from fastapi import HTTPException, Query
from pydantic import AfterValidator, BaseModel

from api.csv_export import csv_response, csv_responses
from api.pagination import Page, PageParams
from api.routes.alarms import CityFilter, time_window
from api.routes.telemetry import Aware, _zone            # the telemetry series' time and zone parameters
from api.schemas import city_names
from iotjx.apikeys import ApiKey

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)


Day = date                      # any: PostgreSQL's date holds every one Python's does
From = Annotated[Aware, Query(alias="from", description="start, with an offset (e.g. 2026-12-01T00:00:00+08:00)")]
To = Annotated[Aware, Query(description="end (exclusive), with an offset")]


Tz = Annotated[str | None, Query(max_length=64, description="IANA zone of the local hours (default IOTJX_TIMEZONE)"),
               AfterValidator(lambda v: v and _zone(v))]


class DeviceWhere(BaseModel):
    """A device of a figure's list, and where it is (the first columns of its CSV too)."""
    device_id: str
    model: str
    city: int | None
    city_name_zh: str | None
    city_name_en: str | None
    site_name: str | None


def cities_for(key: ApiKey, city: int | None) -> list[int | None]:
    """The cities one call covers: the one asked (403 outside the key's scope), else the key's cities,
    else [None] (every city, devices without a site included)."""
    if city is not None:
        if not key.sees_city(city):
            raise HTTPException(403, f"city {city} is outside this key's cities")
        return [city]
    return [None] if key.cities is None else sorted(key.cities)


def per_city(key: ApiKey, city: int | None, figure: Callable[[int | None], Iterable[T]]) -> list[T]:
    """`figure(city)` for each city the call covers, the rows put together in that order."""
    return [row for c in cities_for(key, city) for row in figure(c)]


def window(since: datetime, until: datetime, max_days: float) -> tuple[datetime, datetime]:
    """[from, to): 422 when `to` is not after `from` or the window is longer than `max_days`."""
    since, until = time_window(since, until, ("from", "to"))
    if until - since > timedelta(days=max_days):
        raise HTTPException(422, f"from … to spans {(until - since).total_seconds() / 86400:.2f} days; at most "
                                 f"{max_days:g} days here (ask for several windows)")
    return since, until


def day_window(since: date, until: date, max_days: int) -> tuple[date, date]:
    """Local days [from, to): 422 when `to` is not after `from` or there are more than `max_days`."""
    if until <= since:
        raise HTTPException(422, f"to ({until}) must be after from ({since})")
    if (until - since).days > max_days:
        raise HTTPException(422, f"from … to spans {(until - since).days} days; at most {max_days} here")
    return since, until


def site_codes(conn: psycopg.Connection, site_ids: Iterable[int | None]) -> dict[int, str | None]:
    """The catalogue code of each site row (None for a site made from free text)."""
    ids = sorted({s for s in site_ids if s is not None})
    return dict(conn.execute("SELECT site_id, code FROM sites WHERE site_id = ANY(%s)", (ids,)).fetchall())


def city_of(code: int | None) -> dict[str, Any]:
    """`city` (None for no site), `city_name_zh`, `city_name_en` of a division code (0: no site)."""
    return city_names(code)


def page_of(items: Sequence[R], page: PageParams, key: Callable[[R], tuple], types: tuple[type, ...]) -> Page[R]:
    """One keyset page of a list computed whole (sorted by `key`, whose values are never None): the items
    after the cursor's key, `page.limit` of them."""
    after = page.after(len(types), types)
    rows = sorted(items, key=key)
    if after is not None:
        try:
            rows = [r for r in rows if key(r) > after]
        except TypeError:              # a cursor of another list whose values do not compare
            raise HTTPException(422, "cursor: not a cursor of this list (pass next_cursor of the previous page "
                                     "as is)") from None
    return page.of(rows[:page.limit + 1], key=key)


def page_by_device(key: ApiKey, city: int | None, page: PageParams,
                   fetch: Callable[[int | None, str | None, int], Sequence[R]]) -> Page[R]:
    """One keyset page, by device id, of a device list computed in SQL a page at a time: `fetch(city, after,
    n)` gives the city's first `n` items (each with a `device_id`) after device id `after` (None: from the
    first); run for each city the call covers and put together, so no call computes the whole list."""
    after = page.after(1, (str,))
    if after is not None and after[0] is None:
        raise HTTPException(422, "cursor: not a cursor of this list (pass next_cursor of the previous page as is)")
    n = page.limit + 1
    rows = sorted((r for c in cities_for(key, city) for r in fetch(c, after and after[0], n)),
                  key=lambda r: r.device_id)
    return page.of(rows[:n], key=lambda r: (r.device_id,))


__all__ = ["Aware", "CityFilter", "Day", "DeviceWhere", "From", "To", "Tz", "cities_for", "city_of", "csv_response",
           "csv_responses", "day_window", "page_by_device", "page_of", "per_city", "site_codes", "window"]
