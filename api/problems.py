"""RFC 9457 problem documents: how every error of the API is rendered and documented."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# The OpenAPI description of an error response, for `responses={status: PROBLEM}`.
PROBLEM = {"content": {"application/problem+json": {"schema": {"type": "object", "properties": {
    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {}}}}}}


def problem(status: int, title: str, detail: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    return JSONResponse({"type": "about:blank", "title": title, "status": status, "detail": detail},
                        status_code=status, media_type="application/problem+json")
