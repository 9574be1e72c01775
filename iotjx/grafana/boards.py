"""The five Grafana boards, built with grafana-foundation-sdk's typed builders and encoded by its JSON
encoder: `generate()` is a pure function from the panels' SQL (`iotjx.grafana.panels`) and the targets
catalogue to `{file name: JSON text}`, written to deploy/grafana/dashboards/ by `iotjx grafana generate`.

Fixed uids (boards, data source, folder) make a second push or provisioning an update, not a copy."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import geomap, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

from iotjx.grafana import panels as P
from iotjx.grafana.coverage_board import coverage_panels
from iotjx.grafana.pgquery import PLUGIN_TYPE, Postgres, register

DATASOURCE_UID = "iotjx-postgres"
DATASOURCE_NAME = "iotjx"
FOLDER_UID = "iotjx"
FOLDER_TITLE = "iotjx"
DATASOURCE = model.DataSourceRef(type_val=PLUGIN_TYPE, uid=DATASOURCE_UID)
DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
TIME_RANGE = ("now-7d", "now")

register()


def boards_panels(targets: dict[str, tuple[str, bool]] | None = None) -> dict[str, tuple[str, tuple[P.Panel, ...]]]:
    """Board uid → (title, panels); `targets` as `catalogue_targets` (default: the bundled catalogue's)."""
    if targets is None:
        targets = catalogue_targets()
    return {
        "iotjx-operations": ("iotjx · Operations", P.OPERATIONS),
        "iotjx-water": ("iotjx · Water", P.WATER),
        "iotjx-fire": ("iotjx · Fire", P.FIRE),
        "iotjx-traffic": ("iotjx · Traffic", P.TRAFFIC),
        "iotjx-coverage": ("iotjx · Coverage", coverage_panels(targets)),
    }


def catalogue_targets(path: Path | None = None) -> dict[str, tuple[str, bool]]:
    """Target id → (deadline as an ISO day, whether operators enter its figure), from a targets
    catalogue (default: the bundled one)."""
    from iotjx.targets import load_catalogue

    return {t.target_id: (t.deadline.isoformat(), t.measure == "operator")
            for t in load_catalogue(path, check_models=False)}


def _all() -> model.VariableOption:
    return model.VariableOption(selected=True, text="All", value="$__all")


def variables() -> list:
    """city, pilot, network, site: multi-value with All (site depends on city)."""
    out = []
    for name, (label, query) in P.VARIABLES.items():
        if name in P.QUERY_VARIABLES:
            v = (dash.QueryVariable(name).label(label).query(query).datasource(DATASOURCE)
                 .refresh(model.VariableRefresh.ON_DASHBOARD_LOAD).sort(model.VariableSort.DISABLED))
        else:
            v = dash.CustomVariable(name).label(label).values(query)
        out.append(v.multi(True).include_all(True).current(_all()))
    return out


def _panel(p: P.Panel, panel_id: int, x: int, y: int):
    target = Postgres().ref_id("A").raw_sql(p.sql.strip()).format(p.format).datasource(DATASOURCE)
    if p.kind == "timeseries":
        b = timeseries.Panel()
    elif p.kind == "table":
        b = table.Panel()
    elif p.kind == "geomap":
        b = _geomap()
    else:
        raise ValueError(f"no builder for panel kind {p.kind!r}")
    b = (b.id(panel_id).title(p.title).description(p.description).datasource(DATASOURCE).with_target(target)
         .grid_pos(model.GridPos(h=p.height, w=p.width, x=x, y=y)))
    if p.unit:
        b = b.unit(p.unit)
    if p.threshold is not None:
        b = (b.thresholds(dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE)
                          .steps([model.Threshold(value=None, color="green"),
                                  model.Threshold(value=p.threshold, color="red")]))
             .thresholds_style(common_b.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE)))
    return b


def _geomap():
    markers = (common_b.MapLayerOptions().type("markers").name("Cities")
               .location(common_b.FrameGeometrySource().mode(common.FrameGeometrySourceMode.COORDS)
                         .latitude("latitude").longitude("longitude"))
               .config({"showLegend": True,
                        "style": {"size": {"field": "registered", "fixed": 6, "min": 6, "max": 30},
                                  "color": {"fixed": "dark-green"},
                                  "text": {"field": "city", "mode": "field"},
                                  "textConfig": {"fontSize": 12, "offsetY": -14}}}))
    return (geomap.Panel().view(geomap.MapViewConfig().id("coords").lat(27).lon(116).zoom(6))
            .basemap(common_b.MapLayerOptions().type("default").name("Basemap"))
            .layers([markers]))


def _layout(panels: Iterable[P.Panel]) -> Iterable[tuple[P.Panel, int, int]]:
    """Left to right, wrapping at Grafana's 24 columns."""
    x = y = row_h = 0
    for p in panels:
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        yield p, x, y
        x += p.width
        row_h = max(row_h, p.height)


def build(uid: str, title: str, panels: tuple[P.Panel, ...]) -> model.Dashboard:
    """One board as the SDK's typed Dashboard."""
    b = (dash.Dashboard(title).uid(uid).tags(["iotjx"]).timezone("browser").time(*TIME_RANGE).refresh("1m")
         .tooltip(model.DashboardCursorSync.CROSSHAIR).editable().variables(variables()))
    for k, (p, x, y) in enumerate(_layout(panels), start=1):
        b = b.with_panel(_panel(p, k, x, y))
    return b.build()


def to_json(board: model.Dashboard) -> str:
    """The SDK's encoding, keys sorted: the same board gives the same bytes."""
    return json.dumps(board, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate(targets: dict[str, tuple[str, bool]] | None = None) -> dict[str, str]:
    """File name → JSON text of every board."""
    return {f"{uid}.json": to_json(build(uid, title, panels))
            for uid, (title, panels) in boards_panels(targets).items()}


def write(directory: Path = DASHBOARDS_DIR) -> list[Path]:
    """Write every board under `directory` (stale iotjx-*.json files removed); returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    files = generate()
    for stale in directory.glob("iotjx-*.json"):
        if stale.name not in files:
            stale.unlink()
    out = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        out.append(path)
    return out


def differences(directory: Path = DASHBOARDS_DIR) -> list[str]:
    """The board files under `directory` that differ from a fresh generation (missing, changed, stale)."""
    files = generate()
    found = {p.name: p.read_text(encoding="utf-8") for p in directory.glob("iotjx-*.json")} if directory.is_dir() else {}
    return sorted({n for n in files if found.get(n) != files[n]} | {n for n in found if n not in files})
