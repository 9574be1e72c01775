"""The audit log, newest first (an admin key without a city scope: the log spans every city)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from api.deps import Conn, require_role
from iotjx.apikeys import KEY_ID, ApiKey

router = APIRouter(tags=["audit"])

WholeProvinceAdmin = Annotated[ApiKey, Depends(require_role("admin", whole_province=True))]


class AuditOut(BaseModel):
    audit_id: int
    at: datetime
    actor: str
    key_id: str | None
    method: str
    route: str
    target: str | None
    change: dict[str, Any]
    status: int | None


@router.get("/audit", response_model=list[AuditOut], summary="Who changed what, newest first")
def get_audit(key: WholeProvinceAdmin, conn: Conn,
              key_id: Annotated[str | None, Query(pattern=KEY_ID.pattern)] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditOut]:
    rows = conn.execute("""SELECT audit_id, at, actor, key_id, method, route, target, change, status FROM audit_log
                           WHERE %(key)s::text IS NULL OR key_id = %(key)s ORDER BY audit_id DESC LIMIT %(limit)s""",
                        {"key": key_id, "limit": limit}).fetchall()
    return [AuditOut(**dict(zip(AuditOut.model_fields, r, strict=True))) for r in rows]
