"""Cursor pagination, one way for every list of the API.

A list route takes `cursor` (opaque; from the previous page's `next_cursor`) and `limit` (1-1000,
default 100) and answers a `Page[...]`: `items` and `next_cursor` (None on the last page).  The cursor
is keyset pagination: it holds the sort key of the page's last item, so a page is one index range
scan however deep, and rows inserted meanwhile neither repeat nor shift a page.  Filters and the
key's city scope apply to every page (a cursor names a position, never grants a row).

    @router.get("/things", response_model=Page[ThingOut])
    def things(key: Viewer, conn: Conn, page: PageQuery) -> Page[ThingOut]:
        after = page.after(2)                    # None, or the (time, id) of the last item seen
        rows = ... WHERE (%(after)s IS NULL OR (time, id) < (%(t)s, %(id)s)) ORDER BY time DESC, id DESC
                   LIMIT page.limit + 1
        return page.of([ThingOut(...) for r in rows], key=lambda r: (r.time, r.id))

A cursor that is not one of ours (tampered, truncated, from another list) is a 422 problem."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, HTTPException, Query
from pydantic import BaseModel

T = TypeVar("T")
MAX_LIMIT = 1000
MAX_CURSOR = 512


class Page(BaseModel, Generic[T]):
    """One page of a list: its items, and the cursor of the next page (None: this is the last)."""

    items: list[T]
    next_cursor: str | None


def encode_cursor(values: Sequence[Any]) -> str:
    """An opaque cursor for a sort key (ints, floats, text, None, aware datetimes, dates)."""
    out = []
    for v in values:
        if isinstance(v, datetime):
            out.append({"t": v.isoformat()})
        elif isinstance(v, date):
            out.append({"d": v.isoformat()})
        elif v is None or isinstance(v, (int, float, str)):
            out.append(v)
        else:
            raise TypeError(f"a cursor holds ints, floats, text, dates and times, not {type(v).__name__}")
    raw = json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, n: int) -> tuple:
    """The sort key a cursor holds, of `n` values; 422 when it is not a cursor this API made."""
    try:
        if len(cursor) > MAX_CURSOR:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
        if not isinstance(values, list) or len(values) != n:
            raise ValueError("wrong shape")
        out = []
        for v in values:
            if isinstance(v, dict) and list(v) == ["t"]:
                t = datetime.fromisoformat(v["t"])
                if t.tzinfo is None:
                    raise ValueError("naive time")
                out.append(t)
            elif isinstance(v, dict) and list(v) == ["d"]:
                out.append(date.fromisoformat(v["d"]))
            elif v is None or isinstance(v, (int, float, str)) and not isinstance(v, bool):
                if isinstance(v, str) and "\x00" in v:
                    raise ValueError("NUL")
                if isinstance(v, int) and not -2**63 <= v < 2**63:
                    raise ValueError("out of range")
                out.append(v)
            else:
                raise ValueError("not a cursor value")
        return tuple(out)
    except (ValueError, TypeError, UnicodeDecodeError, json.JSONDecodeError):
        raise HTTPException(422, "cursor: not a cursor of this list (pass next_cursor of the previous page as is)"
                            ) from None


@dataclass(frozen=True, slots=True)
class PageParams:
    cursor: str | None
    limit: int

    def after(self, n: int, types: tuple[type, ...] | None = None) -> tuple | None:
        """The sort key (`n` values; of `types` when given, None allowed) the page starts after; None for
        the first page."""
        if self.cursor is None:
            return None
        key = decode_cursor(self.cursor, n)
        if types is not None and not all(v is None or (isinstance(v, t) and not isinstance(v, bool))
                                         for v, t in zip(key, types, strict=True)):
            raise HTTPException(422, "cursor: not a cursor of this list (pass next_cursor of the previous page as is)")
        return key

    def of(self, rows: list[T], key: Callable[[T], Sequence[Any]]) -> Page[T]:
        """The page of `rows` fetched with LIMIT limit + 1 (the extra row says a next page exists)."""
        more = len(rows) > self.limit
        rows = rows[:self.limit]
        return Page[Any](items=rows, next_cursor=encode_cursor(key(rows[-1])) if more and rows else None)


def newest_first(page: PageParams, time_col: str, id_col: str) -> tuple[str, dict[str, Any]]:
    """The keyset tail of a list newest first by (time, id): SQL ` AND … ORDER BY … LIMIT …` to append to
    its WHERE, and its parameters (the rows before the cursor's (time, id), one more than the page so
    that `page.of` knows whether another follows; 422 for a cursor of another shape)."""
    after = page.after(2, (datetime, int))
    # Only with a cursor (not `%(a_t)s IS NULL OR …`): a generic plan of a prepared statement could not use the
    # row comparison as an index condition and would read the list from its newest row on every page.
    sql = ((f" AND ({time_col}, {id_col}) < (%(a_t)s, %(a_id)s)" if after else "")
           + f" ORDER BY {time_col} DESC, {id_col} DESC LIMIT %(n)s")
    return sql, {"a_t": after and after[0], "a_id": after and after[1], "n": page.limit + 1}


def _page_params(cursor: Annotated[str | None, Query(max_length=MAX_CURSOR, pattern=r"^[A-Za-z0-9_-]+$",  # base64url
                                                     description="next_cursor of the previous page")] = None,
                 limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="items per page")] = 100) -> PageParams:
    return PageParams(cursor, limit)


PageQuery = Annotated[PageParams, Depends(_page_params)]

__all__ = ["MAX_LIMIT", "Page", "PageParams", "PageQuery", "decode_cursor", "encode_cursor", "newest_first"]
