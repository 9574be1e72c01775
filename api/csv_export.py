"""CSV answers of the lists and figures (the `.csv` twins of JSON routes): the rows of a response model,
streamed, one header line of its fields."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api.problems import PROBLEM


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def csv_response(model: type[BaseModel], rows: Iterable[BaseModel], filename: str) -> StreamingResponse:
    """The rows as CSV (UTF-8, a header line of the model's fields, empty for null), streamed."""
    fields = list(model.model_fields)

    def chunks() -> Iterator[bytes]:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(fields)
        for n, row in enumerate(rows, 1):
            values = row.model_dump()
            writer.writerow([_cell(values[f]) for f in fields])
            if n % 1000 == 0:
                yield out.getvalue().encode()
                out.seek(0)
                out.truncate()
        yield out.getvalue().encode()

    return StreamingResponse(chunks(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def csv_responses(what: str, problems: tuple[int, ...] = (403, 404, 422)) -> dict:
    """The OpenAPI responses of a CSV twin: the CSV, and the problem documents it may answer instead."""
    return {200: {"description": what, "content": {"text/csv": {"schema": {"type": "string"}}}},
            **{code: PROBLEM for code in problems}}
