"""The audit log, newest first (an admin key without a city scope: the log spans every city)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from api.deps import Conn, require_role
from api.pagination import Page, PageQuery
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


@router.get("/audit", response_model=Page[AuditOut], summary="Who changed what, newest first (cursor pages)")
def get_audit(key: WholeProvinceAdmin, conn: Conn, page: PageQuery,
              key_id: Annotated[str | None, Query(pattern=KEY_ID.pattern)] = None) -> Page[AuditOut]:
    after = page.after(1, (int,))
    rows = conn.execute("""SELECT audit_id, at, actor, key_id, method, route, target, change, status FROM audit_log
                           WHERE (%(key)s::text IS NULL OR key_id = %(key)s)
                             AND (%(after)s::bigint IS NULL OR audit_id < %(after)s)
                           ORDER BY audit_id DESC LIMIT %(limit)s""",
                        {"key": key_id, "limit": page.limit + 1, "after": after and after[0]}).fetchall()
    return page.of([AuditOut(**dict(zip(AuditOut.model_fields, r, strict=True))) for r in rows],
                   key=lambda a: (a.audit_id,))
