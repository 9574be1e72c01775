"""A CSV import route's body, shared by `POST /devices/bulk` and `POST /sites/bulk`: the body streams
into a spooled file (memory up to SPOOL_IN_MEMORY, then disk; its size bounded by api.limits.BodyLimit)
and is parsed a line at a time, checked and applied all or nothing on a worker thread, so the event
loop keeps answering meanwhile; the import and its audit row commit together."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool

from api.deps import audit_write
from iotjx.apikeys import ApiKey
from iotjx.devices import Registry

SPOOL_IN_MEMORY = 1 << 20        # a CSV body past this goes to a temporary file while it arrives


def refuse_unless_csv(request: Request) -> None:
    """415 unless the body is declared `text/csv` (a `charset` parameter, if any, utf-8).  A request
    without Content-Type is taken as CSV."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media, _, params = declared.partition(";")
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params.split(";"))
                    if k.strip().lower() == "charset"), "utf-8")
    if media.strip().lower() != "text/csv" or charset not in ("utf-8", "utf8"):
        raise HTTPException(415, f"this route takes a CSV body: Content-Type: text/csv (UTF-8), not {declared[:100]!r}")


async def import_csv(request: Request, key: ApiKey, pool: ConnectionPool, *, parse: Callable[..., list],
                     apply: Callable[..., dict[str, Any]], noun: str) -> dict[str, Any]:
    """`parse(lines, registry=…)` the body's records, then `apply(conn, records, first_line=2, cities=…)`
    them; 422 for a header without records.  Returns what `apply` counted."""

    refuse_unless_csv(request)

    def run(csv_body) -> dict[str, Any]:
        lines = io.TextIOWrapper(csv_body, encoding="utf-8", newline="")
        with pool.connection() as conn:
            records = parse(lines, registry=Registry.load(conn))
            if not records:
                raise HTTPException(422, f"the CSV has a header but no {noun}")
            with conn.transaction():
                result = apply(conn, records, first_line=2, cities=key.cities)
                audit_write(conn, request, key, target=None, change={**result, noun: len(records)}, status=200)
        return result

    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as csv_body:
        async for chunk in request.stream():
            csv_body.write(chunk)
        csv_body.seek(0)
        return await run_in_threadpool(run, csv_body)
