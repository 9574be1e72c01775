"""The generated boards: what grafana-foundation-sdk's types produce (decoded by the SDK and encoded
again: the same JSON), stable (generated twice: identical), the checked-in files equal to a fresh
generation, and the layout and variables every board shares."""

from __future__ import annotations

import json

import yaml
from grafana_foundation_sdk.models import dashboard as model
from typer.testing import CliRunner

from iotjx.db.migrations import CITIES
from iotjx.grafana import boards, provisioning
from iotjx.grafana.coverage_board import CITY_COORDINATES
from iotjx.grafana.pgquery import PostgresQuery


def test_generation_is_stable_and_the_checked_in_files_are_fresh():
    assert boards.generate() == boards.generate()
    assert boards.differences() == [], "run `iotjx grafana generate`"
    assert provisioning.differences() == [], "run `iotjx grafana generate`"
    assert sorted(p.name for p in boards.DASHBOARDS_DIR.glob("*.json")) == sorted(boards.generate())
    from iotjx.cli import app
    out = CliRunner().invoke(app, ["grafana", "generate", "--check"])
    assert out.exit_code == 0, out.output


def test_check_names_a_stale_file(tmp_path):
    from iotjx.cli import app

    assert CliRunner().invoke(app, ["grafana", "generate", "--out", str(tmp_path)]).exit_code == 0
    assert CliRunner().invoke(app, ["grafana", "generate", "--check", "--out", str(tmp_path)]).exit_code == 0
    (tmp_path / "dashboards" / "iotjx-fire.json").write_text("{}")
    (tmp_path / "dashboards" / "iotjx-old.json").write_text("{}")
    assert boards.differences(tmp_path / "dashboards") == ["iotjx-fire.json", "iotjx-old.json"]
    out = CliRunner().invoke(app, ["grafana", "generate", "--check", "--out", str(tmp_path)])
    assert out.exit_code == 1 and "iotjx-fire.json, iotjx-old.json" in out.output
    boards.write(tmp_path / "dashboards")
    assert boards.differences(tmp_path / "dashboards") == []


def test_the_json_is_what_the_sdk_types_produce():
    for name, text in boards.generate().items():
        data = json.loads(text)
        decoded = model.Dashboard.from_json(data)
        assert json.loads(boards.to_json(decoded)) == data, name
        for panel in decoded.panels:
            (target,) = panel.targets
            assert isinstance(target, PostgresQuery) and target.datasource.uid == boards.DATASOURCE_UID


def test_every_board_has_the_variables_and_a_clean_layout():
    for name, text in boards.generate().items():
        board = json.loads(text)
        assert board["uid"] == name.removesuffix(".json")
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert list(variables) == ["city", "pilot", "network", "site"]
        assert all(v["multi"] and v["includeAll"] for v in variables.values())
        assert "$city" in variables["site"]["query"]
        cells = set()
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for p in board["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{name}: {p['title']} overlaps"
            cells |= mine
            assert p["datasource"] == {"type": "grafana-postgresql-datasource", "uid": boards.DATASOURCE_UID}
            assert p["targets"][0]["format"] in ("time_series", "table")


def test_the_map_places_the_eleven_cities():
    board = json.loads(boards.generate()["iotjx-coverage.json"])
    (geo,) = [p for p in board["panels"] if p["type"] == "geomap"]
    sql = geo["targets"][0]["rawSql"]
    for code, _, _ in CITIES:
        lat, lon = CITY_COORDINATES[code]
        assert f"({code}, {lat:.2f}, {lon:.2f})" in sql
        assert 24.4 < lat < 30.1 and 113.5 < lon < 118.5          # inside Jiangxi's bounding box
    layer = geo["options"]["layers"][0]
    assert layer["location"] == {"mode": "coords", "latitude": "latitude", "longitude": "longitude"}


def test_provisioning_reads_the_database_from_grafanas_environment():
    files = provisioning.files()
    (ds,) = yaml.safe_load(files["datasources/iotjx.yaml"])["datasources"]
    assert ds["uid"] == boards.DATASOURCE_UID and ds["type"] == "grafana-postgresql-datasource"
    text = files["datasources/iotjx.yaml"]
    for var in provisioning.DB_ENV:
        assert "${" + var + "}" in text
    (provider,) = yaml.safe_load(files["dashboards/iotjx.yaml"])["providers"]
    assert provider["folderUid"] == boards.FOLDER_UID and provider["options"]["path"] == provisioning.DASHBOARDS_MOUNT
