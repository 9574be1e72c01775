"""The PostgreSQL query of Grafana's built-in SQL data source, as a grafana-foundation-sdk data query.

The SDK (11.6 build) ships query types for Prometheus, Loki, Elasticsearch, … but none for PostgreSQL.
This is that small piece, in the SDK's own shape: a model with `to_json`/`from_json`, a builder, and
a variant registered with the SDK's runtime so that a dashboard decoded with
`dashboard.Dashboard.from_json` gets these objects back.  The JSON keys are the ones Grafana's SQL
data source reads from a target: `refId`, `rawSql`, `format` (`time_series` or `table`), `rawQuery`
and `editorMode` (`code`: the SQL is shown as written, not rebuilt by the visual editor), `datasource`."""

from __future__ import annotations

import typing

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard

PLUGIN_TYPE = "grafana-postgresql-datasource"     # the data source's plugin id since Grafana 10.2
FORMATS = ("time_series", "table")


class PostgresQuery(cogvariants.Dataquery):
    """One SQL target of a panel."""

    ref_id: str
    raw_sql: str
    format_val: str
    datasource: dashboard.DataSourceRef | None
    hide: bool | None

    def __init__(self, ref_id: str = "A", raw_sql: str = "", format_val: str = "time_series",
                 datasource: dashboard.DataSourceRef | None = None, hide: bool | None = None) -> None:
        self.ref_id = ref_id
        self.raw_sql = raw_sql
        self.format_val = format_val
        self.datasource = datasource
        self.hide = hide

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {"refId": self.ref_id, "rawSql": self.raw_sql, "format": self.format_val,
                                      "rawQuery": True, "editorMode": "code"}
        if self.datasource is not None:
            payload["datasource"] = self.datasource
        if self.hide is not None:
            payload["hide"] = self.hide
        return payload

    @classmethod
    def from_json(cls, data: dict[str, typing.Any]) -> PostgresQuery:
        ds = data.get("datasource")
        return cls(ref_id=data.get("refId", ""), raw_sql=data.get("rawSql", ""),
                   format_val=data.get("format", "time_series"),
                   datasource=dashboard.DataSourceRef.from_json(ds) if isinstance(ds, dict) else None,
                   hide=data.get("hide"))


class Postgres(cogbuilder.Builder[PostgresQuery]):
    """Builder of a `PostgresQuery`, in the SDK's builder style."""

    _internal: PostgresQuery

    def __init__(self) -> None:
        self._internal = PostgresQuery()

    def build(self) -> PostgresQuery:
        return self._internal

    def ref_id(self, ref_id: str) -> typing.Self:
        self._internal.ref_id = ref_id
        return self

    def raw_sql(self, raw_sql: str) -> typing.Self:
        self._internal.raw_sql = raw_sql
        return self

    def format(self, format_val: str) -> typing.Self:
        if format_val not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format_val!r}")
        self._internal.format_val = format_val
        return self

    def datasource(self, datasource: dashboard.DataSourceRef) -> typing.Self:
        self._internal.datasource = datasource
        return self


def register() -> None:
    """Teach the SDK's runtime to decode targets of this plugin type into `PostgresQuery` (idempotent)."""
    cogruntime.Runtime().register_dataquery_variant(
        cogruntime.DataqueryConfig(identifier=PLUGIN_TYPE, from_json_hook=PostgresQuery.from_json))
