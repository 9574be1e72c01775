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
from iotjx.devices import RegistrationError, Registry, parse_csv_rows, register_devices

SPOOL_IN_MEMORY = 1 << 20        # a CSV body past this goes to a temporary file while it arrives
MAX_SHOWN = 10_000               # bad-line reasons listed by a skipping import; errors_total counts all


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

    return await _spooled(request, run)


async def _spooled(request: Request, run: Callable[[Any], Any]) -> Any:
    """`run(file)` on a worker thread, over the request body spooled to a file."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as csv_body:
        async for chunk in request.stream():
            csv_body.write(chunk)
        csv_body.seek(0)
        return await run_in_threadpool(run, csv_body)


CSV_MEDIA_TYPES = ("text/csv", "application/csv")


def require_csv(request: Request) -> None:
    """415 unless the body is declared CSV (`text/csv` or `application/csv`) in UTF-8 (or no charset),
    or not declared at all (read as CSV, as before there was a check)."""
    if "content-type" not in request.headers:
        return
    media, _, params = request.headers.get("content-type", "").partition(";")
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params.split(";"))
                    if k.strip().lower() == "charset"), "utf-8")
    if media.strip().lower() not in CSV_MEDIA_TYPES or charset not in ("utf-8", "utf8", "us-ascii"):
        shown = request.headers.get("content-type", "none")[:100]
        raise HTTPException(415, f"send the devices as CSV: Content-Type text/csv (UTF-8), not {shown}")


async def import_devices_skipping(request: Request, key: ApiKey, pool: ConnectionPool,
                                  max_shown: int = MAX_SHOWN) -> dict[str, Any]:
    """The device CSV in the body, a bad line set aside: the good lines are registered in one
    transaction and every bad line is reported with its reasons (lines the file itself makes bad, and
    lines the registry refuses: an unknown catalogue site, a city outside the key's scope, a device of
    another city).  A bad line writes nothing.  422 (as all or nothing) only for a file that cannot be
    read through: no required header, a line that is not CSV, no records at all; 415 for non-UTF-8."""

    def run(csv_body) -> dict[str, Any]:
        lines = io.TextIOWrapper(csv_body, encoding="utf-8", newline="")
        with pool.connection() as conn:
            parsed = parse_csv_rows(lines, registry=Registry.load(conn), max_errors=max_shown)
            if not parsed.records and not parsed.bad_lines:
                raise HTTPException(422, "the CSV has a header but no devices")
            records, numbers = parsed.records, parsed.lines
            errors, total, bad = list(parsed.errors), parsed.errors_total, parsed.bad_lines
            result = {"created": 0, "updated": 0, "sites": 0, "catalogue_sites": 0, "unverified_sites": 0}
            with conn.transaction():
                while records:
                    try:
                        with conn.transaction():        # a savepoint: a refusal leaves nothing behind
                            result = register_devices(conn, records, lines=numbers, cities=key.cities,
                                                      max_errors=10 * len(records) + 10)
                        break
                    except RegistrationError as exc:
                        refused = {n for n, _ in exc.errors}
                        if not refused <= set(numbers):        # not about lines: nothing to set aside
                            raise
                        errors += exc.errors
                        total += exc.total
                        bad += len(refused)
                        kept = [i for i, n in enumerate(numbers) if n not in refused]
                        records, numbers = [records[i] for i in kept], [numbers[i] for i in kept]
                audit_write(conn, request, key, target=None, status=200,
                            change={**result, "devices": len(records), "skipped": bad, "on_error": "skip"})
        errors.sort(key=lambda e: e[0])
        return {**result, "skipped": bad, "errors": [{"line": n, "error": m} for n, m in errors[:max_shown]],
                "errors_total": total}

    return await _spooled(request, run)
