"""The coverage report as one self-contained HTML page (`iotjx report coverage --html`, `GET
/reports/coverage`): the plan's targets with their verdicts, the programme's targets with a history chart
and their pace, a chart per city (registered, active and live devices per pilot), and radio coverage by
city.  The page is rendered from the very document `/coverage` answers (its JSON form), so the two cannot
disagree; every figure also rides in a `data-*` attribute with its exact value, for tests and scrapers.

Charts are drawn server-side with matplotlib to SVG and inlined as `data:` images: no script, no
network, no font download (matplotlib writes glyphs as paths, Chinese ones included, from the host's
Noto CJK font); each SVG is its own document, so the ids matplotlib writes cannot collide.  Plain CSS
with an `@media print` block: the page prints on A4 with sections kept whole."""

from __future__ import annotations

import base64
import io
import math
import threading
from collections.abc import Iterable
from datetime import date, datetime
from html import escape
from typing import Any

STATUS_TEXT = {"met": "met", "missed": "missed", "on_track": "on track", "at_risk": "at risk", "unknown": "unknown"}
SERIES_COLOURS = {"registered": "#c7c7c7", "active": "#6baed6", "live": "#2ca02c"}
# Fonts tried in order by matplotlib (glyph by glyph since matplotlib 3.6): Latin from DejaVu, Chinese from
# Debian's fonts-noto-cjk.  Without a CJK font the charts still render, the city names as boxes.
CHART_FONTS = ["DejaVu Sans", "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Serif CJK JP", "WenQuanYi Zen Hei"]
PAGE_FONTS = ('"Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", '
              '"Microsoft YaHei", "PingFang SC", "DejaVu Sans", sans-serif')


# --------------------------------------------------------------------------- formatting

def num(value: float | int | None, unit: str = "", digits: int = 2) -> str:
    """A figure for people: thousands separated, at most `digits` decimals, "—" for none."""
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    if float(value) == int(value):
        text = f"{int(value):,}"
    else:
        text = f"{value:,.{digits}f}".rstrip("0").rstrip(".")
    return f"{text} %" if unit == "percent" else text


def _attr(value: Any) -> str:
    """A figure's exact value for a data-* attribute ("" for none)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return escape(str(value), quote=True)


def _cell(key: str, value: Any, text: str | None = None, cls: str = "") -> str:
    shown = escape(text if text is not None else num(value))
    klass = f' class="{cls}"' if cls else ""
    return f'<td data-key="{key}" data-value="{_attr(value)}"{klass}>{shown}</td>'


def _city_label(zh: str | None, en: str | None) -> str:
    return f"{zh} {en}" if zh and en else (zh or en or "(no site)")


# --------------------------------------------------------------------------- charts

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _svg_img(fig, alt: str, wide: bool = False) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})   # no timestamp: the same data, the same bytes
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="chart{" wide" if wide else ""}" alt="{escape(alt, quote=True)}" src="data:image/svg+xml;base64,{data}">'


_FONTS: list[str] = []


def _chart_fonts() -> list[str]:
    """CHART_FONTS that are installed (matplotlib warns for every glyph of a family it cannot find)."""
    if not _FONTS:
        from matplotlib import font_manager

        have = {f.name for f in font_manager.fontManager.ttflist}
        _FONTS.extend([f for f in CHART_FONTS if f in have] or ["DejaVu Sans"])
    return _FONTS


def _rc():
    import matplotlib

    return matplotlib.rc_context({"font.family": _chart_fonts(), "font.size": 8, "svg.fonttype": "path",
                                  "svg.hashsalt": "iotjx", "axes.spines.top": False, "axes.spines.right": False})


def history_chart(row: dict[str, Any], day: date) -> str:
    """A programme target's daily values (snapshots), today's value, and the target line to its deadline."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    points = [(date.fromisoformat(h["day"]), h["value"]) for h in row["history"] if h["value"] is not None]
    with _rc():
        fig = _figure(3.6, 1.7)
        ax = fig.add_subplot()
        if points:
            ax.plot([d for d, _ in points], [v for _, v in points], color="#1f77b4", lw=1.4, marker=".", ms=3,
                    label="daily value")
        if row["value"] is not None:
            ax.plot([day], [row["value"]], "o", color="#ff7f0e", ms=5, label=f"{day}")
        ax.axhline(row["target"], color="#d62728", ls="--", lw=1, label=f"target {num(row['target'])}")
        ax.set_ylim(bottom=0)
        locator = AutoDateLocator(minticks=2, maxticks=5)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=6, frameon=False, loc="upper left")
        ax.set_title(f"{row['target_id']} (deadline {row['deadline']})", fontsize=8)
        fig.tight_layout(pad=0.4)
        return _svg_img(fig, f"history of {row['target_id']}")


def city_chart(zh: str | None, en: str | None, rows: list[dict[str, Any]]) -> str:
    """One city's devices per pilot: registered, active, live (bars), from the breakdown."""
    pilots = sorted({r["pilot"] for r in rows})
    sums = {p: [sum(r[k] for r in rows if r["pilot"] == p) for k in ("registered", "active", "live")] for p in pilots}
    with _rc():
        fig = _figure(2.6, 1.6)
        ax = fig.add_subplot()
        width = 0.26
        for i, k in enumerate(("registered", "active", "live")):
            xs = [j + (i - 1) * width for j in range(len(pilots))]
            ax.bar(xs, [sums[p][i] for p in pilots], width, label=k, color=SERIES_COLOURS[k])
        ax.set_xticks(range(len(pilots)), pilots)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(_city_label(zh, en), fontsize=9)       # the colours' legend is the section's, in HTML
        fig.tight_layout(pad=0.3)
        return _svg_img(fig, f"devices of {_city_label(zh, en)}")


def radio_chart(rows: list[dict[str, Any]]) -> str:
    """Coverage rate by city (covered ÷ devices with radio)."""
    rows = [r for r in rows if r["coverage_rate"] is not None]
    with _rc():
        fig = _figure(7.0, 0.3 * max(len(rows), 3) + 0.8)
        ax = fig.add_subplot()
        labels = [_city_label(r["city_name_zh"], r["city_name_en"]) for r in rows]
        rates = [100 * r["coverage_rate"] for r in rows]
        ax.barh(labels, rates, color=["#2ca02c" if v >= 90 else "#ff7f0e" if v >= 70 else "#d62728" for v in rates])
        ax.set_xlim(0, 100)
        ax.invert_yaxis()
        ax.set_xlabel("devices covered (%)")
        for y, v in enumerate(rates):
            ax.text(min(v + 1, 92), y, f"{v:.1f} %", va="center", fontsize=7)
        fig.tight_layout(pad=0.4)
        return _svg_img(fig, "radio coverage rate by city", wide=True)


# --------------------------------------------------------------------------- radio rows

def radio_rows(groups: Iterable[Any], names: dict[int, tuple[str, str]], visible=lambda city: True) -> list[dict[str, Any]]:
    """The province and city rows of `analytics.radio.radio_summary`, as plain dicts with the city's names;
    `visible(city)` keeps a city-scoped key's cities (and drops the province row for it)."""
    out = []
    for g in groups:
        if g.level not in ("province", "city"):
            continue
        if g.level == "province" and not visible(None):
            continue
        if g.level == "city" and not visible(g.city_code):
            continue
        zh, en = names.get(g.city_code or 0, (None, None)) if g.level == "city" else ("江西省", "Jiangxi")
        out.append({"level": g.level, "city": g.city_code, "city_name_zh": zh, "city_name_en": en,
                    "with_radio": g.with_radio, "without_radio": g.without_radio, "covered": g.covered,
                    "weak": g.weak, "coverage_rate": g.coverage_rate, "rsrp_p10": g.rsrp_p10, "rsrp_p50": g.rsrp_p50,
                    "rsrp_p90": g.rsrp_p90, "sinr_p50": g.sinr_p50, "ecl0": g.ecl_share[0], "ecl1": g.ecl_share[1],
                    "ecl2": g.ecl_share[2]})
    return out


# --------------------------------------------------------------------------- the page

CSS = """
:root { --ink: #222; --muted: #666; --line: #ddd; --met: #1a7f37; --risk: #b26a00; --missed: #c62828; }
* { box-sizing: border-box; }
body { font-family: %(fonts)s; color: var(--ink); margin: 1.5rem auto; max-width: 1180px; padding: 0 1rem;
       font-size: 14px; line-height: 1.4; }
h1 { font-size: 1.5rem; margin: 0 0 .2rem; } h2 { font-size: 1.15rem; margin: 1.6rem 0 .5rem;
       border-bottom: 2px solid var(--ink); padding-bottom: .2rem; }
.meta { color: var(--muted); font-size: .85rem; }
table { border-collapse: collapse; width: 100%%; font-size: .85rem; }
th, td { border-bottom: 1px solid var(--line); padding: .25rem .4rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.status { font-weight: 600; white-space: nowrap; }
.met, .on_track { color: var(--met); } .at_risk { color: var(--risk); } .missed { color: var(--missed); }
.unknown { color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: .6rem; }
.card { border: 1px solid var(--line); border-radius: 4px; padding: .4rem; break-inside: avoid; }
.card p { margin: .2rem 0; font-size: .8rem; }
img.chart { width: 100%%; height: auto; display: block; }
img.chart.wide { max-width: 760px; }
th.n { text-align: right; } td.d { white-space: nowrap; }
.swatch { display: inline-block; width: .8em; height: .8em; margin: 0 .25em 0 .6em; vertical-align: -.05em;
          print-color-adjust: exact; -webkit-print-color-adjust: exact; }
section { break-inside: avoid-page; }
.note { color: var(--muted); font-size: .8rem; }
@media print {
  @page { size: A4 landscape; margin: 12mm; }
  body { margin: 0; max-width: none; font-size: 10pt; }
  h2 { break-after: avoid; }
  tr, .card { break-inside: avoid; }
  .grid { grid-template-columns: repeat(3, 1fr); }
  a { color: inherit; text-decoration: none; }
}
""" % {"fonts": PAGE_FONTS}


def _thead(*cols: str) -> str:
    """A table's opening: one header cell per column ("#name": a number column, right-aligned)."""
    cells = "".join(f'<th class="n">{escape(c[1:])}</th>' if c.startswith("#") else f"<th>{escape(c)}</th>"
                    for c in cols)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>"


def _status_cell(row: dict[str, Any]) -> str:
    status = row["status"]
    text = STATUS_TEXT.get(status, status)
    if row.get("met_at_deadline") is not None:
        text += f" (at deadline: {num(row['value_at_deadline'], row['unit'])})"
    return f'<td data-key="status" data-value="{escape(status)}" class="status {escape(status)}">{escape(text)}</td>'


def _counts(row: dict[str, Any]) -> str:
    if row["measure"] == "operator":
        return "entered by operators"
    if row["measure"] in ("site_share", "sites_meeting"):
        kinds = ", ".join(s["kind"] + (f" {s['min_grade']}+" if s["min_grade"] else "") for s in row["sites"])
        return f"{num(row['sites_meeting'])}/{num(row['sites_in_scope'])} sites ({kinds})"
    return f"{num(row['live'])} live of {num(row['registered'])} registered"


def _plan_section(doc: dict[str, Any]) -> str:
    rows = [r for r in doc["targets"] if r["source"] == "plan"]
    body = []
    for r in rows:
        body.append(
            f'<tr data-target-id="{escape(r["target_id"])}"><td>{escape(r["target_id"])}</td>'
            f'<td>{escape(r["clause_zh"])}<br><span class="note">{escape(r["clause_en"])}</span></td>'
            f'<td>{escape(_counts(r))}</td>'
            + _cell("value", r["value"], num(r["value"], r["unit"]), "n")
            + _cell("target", r["target"], num(r["target"], r["unit"]), "n")
            + _cell("deadline", r["deadline"], r["deadline"], "d")
            + _status_cell(r) + "</tr>")
    return ("<section id=\"plan\"><h2>Plan targets — 江西省数字经济发展三年行动计划（2020-2022年）</h2>"
            + _thead("target", "clause", "counts", "#value", "#target", "deadline", "verdict") + "".join(body)
            + "</tbody></table>" + ("" if rows else "<p class=\"note\">no plan target in scope</p>") + "</section>")


def _scope(r: dict[str, Any]) -> str:
    d = r["devices"] or {}
    place = _city_label(r["city_name_zh"], r["city_name_en"]) if r["city"] else "江西省 Jiangxi"
    what = "/".join(d.get("families", []) + d.get("models", []))
    return " · ".join(x for x in (place, what, d.get("network") or "") if x)


def _programme_section(doc: dict[str, Any]) -> str:
    rows = [r for r in doc["targets"] if r["source"] == "programme"]
    body, cards = [], []
    day = date.fromisoformat(doc["day"])
    for r in rows:
        body.append(
            f'<tr data-target-id="{escape(r["target_id"])}"><td>{escape(r["target_id"])}</td>'
            f'<td>{escape(_scope(r))}</td>'
            + _cell("value", r["value"], None, "n") + _cell("target", r["target"], None, "n")
            + _cell("percent", r["percent"], num(r["percent"], "percent", 1), "n")
            + _cell("deadline", r["deadline"], r["deadline"], "d")
            + _cell("pace_needed", r["pace_needed"], num(r["pace_needed"], digits=1), "n")
            + _cell("pace_observed", r["pace_observed"], num(r["pace_observed"], digits=1), "n")
            + _cell("projected_date", r["projected_date"], r["projected_date"] or "—", "d")
            + _status_cell(r) + "</tr>")
        cards.append(f'<div class="card" data-chart="history" data-target-id="{escape(r["target_id"])}">'
                     + history_chart(r, day)
                     + f'<p>{escape(_scope(r))}: <b>{escape(num(r["value"]))}</b> of {escape(num(r["target"]))}; '
                       f'needs {escape(num(r["pace_needed"], digits=1))}/day, observed '
                       f'{escape(num(r["pace_observed"], digits=1))}/day</p></div>')
    return ("<section id=\"programme\"><h2>Programme targets — live devices, history and pace</h2>"
            + _thead("target", "scope", "#live", "#target", "#%", "deadline", "#pace needed/day", "#observed/day",
                     "projected", "status")
            + "".join(body) + "</tbody></table>"
            + "<p class=\"note\">Pace: needed = what is left ÷ days to the deadline; observed = the change per day "
              "over the last 30 days of snapshots; projected = when the observed pace reaches the target.</p>"
            + "<div class=\"grid\">" + "".join(cards) + "</div></section>")


def _cities_section(doc: dict[str, Any]) -> str:
    by_city: dict[int | None, list[dict[str, Any]]] = {}
    for r in doc["breakdown"]:
        by_city.setdefault(r["city"], []).append(r)
    cards, body = [], []
    for city in sorted(by_city, key=lambda c: (c is None, c or 0)):
        rows = by_city[city]
        zh, en = rows[0]["city_name_zh"], rows[0]["city_name_en"]
        cards.append(f'<div class="card" data-chart="city" data-city="{_attr(city)}">' + city_chart(zh, en, rows)
                     + "</div>")
        for r in rows:
            body.append(f'<tr data-breakdown="{_attr(city)}|{escape(r["pilot"])}|{escape(r["network"])}">'
                        f'<td>{escape(_city_label(zh, en))}</td><td>{escape(r["pilot"])}</td>'
                        f'<td>{escape(r["network"])}</td>' + _cell("registered", r["registered"], None, "n")
                        + _cell("active", r["active"], None, "n") + _cell("live", r["live"], None, "n") + "</tr>")
    legend = " ".join(f'<span class="swatch" style="background:{c}"></span>{k}' for k, c in SERIES_COLOURS.items())
    return ("<section id=\"cities\"><h2>Cities — devices registered, active and live per pilot</h2>"
            f"<p class=\"note\">{legend} (live: reported within its interval)</p><div class=\"grid\">" + "".join(cards) + "</div>"
            + _thead("city", "pilot", "network", "#registered", "#active", "#live") + "".join(body)
            + "</tbody></table></section>")


def _radio_section(radio: list[dict[str, Any]] | None, radio_note: str) -> str:
    if radio is None:
        return ""
    body = []
    for r in radio:
        body.append(f'<tr data-radio="{_attr(r["city"]) if r["level"] == "city" else "province"}">'
                    f'<td>{escape(_city_label(r["city_name_zh"], r["city_name_en"]))}</td>'
                    + _cell("with_radio", r["with_radio"], None, "n")
                    + _cell("without_radio", r["without_radio"], None, "n")
                    + _cell("covered", r["covered"], None, "n") + _cell("weak", r["weak"], None, "n")
                    + _cell("coverage_rate", r["coverage_rate"],
                            "—" if r["coverage_rate"] is None else f"{100 * r['coverage_rate']:.1f} %", "n")
                    + "".join(_cell(k, r[k], num(r[k], digits=1), "n") for k in ("rsrp_p10", "rsrp_p50", "rsrp_p90",
                                                                               "sinr_p50"))
                    + "".join(_cell(k, r[k], "—" if r[k] is None else f"{100 * r[k]:.0f} %", "n")
                              for k in ("ecl0", "ecl1", "ecl2"))
                    + "</tr>")
    cities = [r for r in radio if r["level"] == "city"]
    chart = radio_chart(cities) if any(r["coverage_rate"] is not None for r in cities) else ""
    return ("<section id=\"radio\"><h2>Radio coverage by city</h2>"
            f"<p class=\"note\">{escape(radio_note)}</p>" + chart
            + _thead("city", "#with radio", "#without", "#covered", "#weak", "#coverage", "#RSRP p10", "#p50",
                     "#p90 (dBm)", "#SINR p50 (dB)", "#ECL 0", "#ECL 1", "#ECL 2")
            + "".join(body) + "</tbody></table></section>")


_RENDER = threading.Lock()      # matplotlib's rc_context changes process-wide parameters: one page at a time


def coverage_page(doc: dict[str, Any], radio: list[dict[str, Any]] | None = None, *, radio_note: str = "",
                  scope: str = "the whole province") -> str:
    """The page for `doc`, a `/coverage` answer in its JSON form, and `radio`, rows of `radio_rows`."""
    with _RENDER:
        return _page(doc, radio, radio_note, scope)


def _page(doc: dict[str, Any], radio: list[dict[str, Any]] | None, radio_note: str, scope: str) -> str:
    generated = datetime.fromisoformat(doc["generated_at"])
    state_at = datetime.fromisoformat(doc["state_at"])
    unverified = doc.get("unverified") or {}
    extra = (f" Devices at {unverified['sites']} unverified (free-text) sites: {unverified['devices']}, never counted "
             "toward a plan target." if unverified.get("devices") else "")
    head = (f'<h1>物联江西 · Jiangxi mobile-IoT coverage report</h1>'
            f'<p class="meta" data-day="{escape(doc["day"])}" data-source="{escape(doc["source"])}">'
            f'{escape(doc["source"])} figures of {escape(doc["day"])} ({escape(doc["timezone"])}), describing '
            f'{escape(state_at.isoformat(timespec="seconds"))}; computed {escape(generated.isoformat(timespec="seconds"))}; '
            f'scope: {escape(scope)}. A device is live when it reported within {num(doc["live_factor"])} × its '
            f'reporting interval.{escape(extra)}</p>')
    return ("<!DOCTYPE html>\n<html lang=\"zh-Hans\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>Coverage report {escape(doc['day'])} — iotjx</title><style>{CSS}</style></head><body>"
            + head + _plan_section(doc) + _programme_section(doc) + _cities_section(doc)
            + _radio_section(radio, radio_note) + "</body></html>\n")


# --------------------------------------------------------------------------- from a Report (the CLI, the demo)

def document(report, settings) -> dict[str, Any]:
    """A whole-province `analytics.coverage.Report` as `/coverage` answers it (JSON form) for a key without a
    city scope: the same model, the same names."""
    from api.routes.coverage import CoverageOut, _named

    return CoverageOut(source=report.source, day=report.day, state_at=report.state_at,
                       generated_at=report.generated_at, live_factor=settings.live_factor, timezone=settings.timezone,
                       targets=[_named(r) for r in report.targets], breakdown=[_named(r) for r in report.breakdown],
                       unverified=report.unverified).model_dump(mode="json")


RADIO_DAYS = 7


def radio_for_page(conn, settings, visible=lambda city: True, days: int = RADIO_DAYS) -> tuple[list[dict[str, Any]], str]:
    """Radio by city over the last `days` days (`radio_summary`: each device's latest figures) and its note."""
    from datetime import UTC, timedelta

    from analytics.radio import radio_summary

    since = datetime.now(UTC) - timedelta(days=days)
    groups = radio_summary(conn, since, rsrp_min_dbm=settings.radio_rsrp_min_dbm, sinr_min_db=settings.radio_sinr_min_db)
    names = {c: (zh, en) for c, zh, en in conn.execute("SELECT code, name_zh, name_en FROM cities")}
    note = (f"Each active device's latest radio figures of the last {days} days (to now, whatever day the report "
            f"describes); covered: RSRP ≥ {settings.radio_rsrp_min_dbm:g} dBm and SINR ≥ "
            f"{settings.radio_sinr_min_db:g} dB. p10/p50/p90: percentiles over the devices; ECL: share in each "
            "coverage enhancement level.")
    return radio_rows(groups, names, visible), note


def render_report(conn, report, settings) -> str:
    """The page of a whole-province Report, with radio by city (the CLI and the demo)."""
    radio, note = radio_for_page(conn, settings)
    return coverage_page(document(report, settings), radio, radio_note=note)
