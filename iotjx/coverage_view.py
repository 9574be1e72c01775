"""The coverage report on a terminal (rich): plan targets with their verdicts, programme targets with
their pace, and the breakdown by city × pilot × network.  Shared by `iotjx coverage` and the demo."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table

STATUS_STYLE = {"met": "green", "on_track": "green", "missed": "red", "at_risk": "yellow", "unknown": "dim"}


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    text = f"{value:,.2f}".rstrip("0").rstrip(".") if value != int(value) else f"{int(value):,}"
    return f"{text} %" if unit == "percent" else text


def _status(row: dict[str, Any], day) -> str:
    status = row["status"]
    style = STATUS_STYLE.get(status, "")
    text = status.replace("_", " ")
    if row["met_at_deadline"] is None and status == "unknown" and row["deadline"] < day:
        text = "unknown: no figure on the deadline day"
    return f"[{style}]{text}[/]" if style else text


def plan_table(report) -> Table:
    t = Table(title=f"Plan targets (江西省数字经济发展三年行动计划) — {report.source} figures of {report.day}",
              show_lines=False)
    for col in ("target", "clause", "counts", "value", "target", "deadline", "verdict"):
        t.add_column(col, overflow="fold")
    for r in report.targets:
        if r["source"] != "plan":
            continue
        counts = "entered by operators"
        if r["measure"] in ("site_share", "sites_meeting"):
            counts = (f"{r['sites_meeting']}/{r['sites_in_scope']} sites "
                      f"({', '.join(s['kind'] + (' ' + s['min_grade'] + '+' if s['min_grade'] else '') for s in r['sites'])})")
        verdict = _status(r, report.day)
        if r["met_at_deadline"] is not None:
            verdict += f" (at deadline: {_num(r['value_at_deadline'], r['unit'])})"
        t.add_row(r["target_id"], r["clause_zh"], counts, _num(r["value"], r["unit"]),
                  _num(r["target"], r["unit"]), str(r["deadline"]), verdict)
    return t


def programme_table(report) -> Table:
    t = Table(title="Programme targets (live devices) and pace")
    for col in ("target", "scope", "live", "target", "%", "deadline", "pace needed/day", "observed/day",
                "projected", "status"):
        t.add_column(col, overflow="fold", justify="right" if col in ("live", "target", "%") else "left")
    for r in report.targets:
        if r["source"] != "programme":
            continue
        d = r["devices"] or {}
        scope = " ".join(x for x in (r["city_name"] or "province", "/".join(d.get("families", []) + d.get("models", [])),
                                     d.get("network") or "") if x)
        t.add_row(r["target_id"], scope, _num(r["value"]), _num(r["target"]),
                  "—" if r["percent"] is None else f"{r['percent']:.1f}", str(r["deadline"]),
                  _num(None if r["pace_needed"] is None else round(r["pace_needed"], 1)),
                  _num(None if r["pace_observed"] is None else round(r["pace_observed"], 1)),
                  str(r["projected_date"] or "—"), _status(r, report.day))
    return t


def breakdown_table(report) -> Table:
    t = Table(title="Devices by city, pilot and network (live = reported within its interval)")
    for col in ("city", "pilot", "network", "registered", "active", "live"):
        t.add_column(col, justify="right" if col in ("registered", "active", "live") else "left")
    for r in report.breakdown:
        t.add_row(f"{r['city_zh']} {r['city_en']}" if r["city"] else "(no site)", r["pilot"], r["network"],
                  f"{r['registered']:,}", f"{r['active']:,}", f"{r['live']:,}")
    return t


def report_view(report) -> Group:
    parts = [breakdown_table(report), plan_table(report), programme_table(report)]
    if report.unverified.get("devices"):
        u = report.unverified
        parts.append(f"[yellow]{u['devices']:,} devices at {u['sites']:,} unverified (free-text) sites are not counted "
                     "toward plan targets[/] — add those sites or their names to the catalogue (`iotjx sites import`)")
    return Group(*parts)
