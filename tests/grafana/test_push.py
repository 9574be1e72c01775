"""`iotjx grafana push` against the stand-in for Grafana's HTTP API (tests/grafana/grafana_standin.py;
Grafana cannot be installed here): everything created on the first push, nothing written on the
second, a changed board or database updated alone, and clear errors for a Grafana that does not answer
and for wrong credentials."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from iotjx.grafana import boards
from iotjx.grafana.push import PushError, datasource_from_url, push
from tests.grafana.grafana_standin import GrafanaStandIn

DB = "postgresql://grafana_reader:r3ader@db.internal:5432/iotjx?sslmode=require"


@pytest.fixture
def grafana():
    g = GrafanaStandIn().start()
    yield g
    g.stop()


def test_first_push_creates_everything_with_fixed_uids(grafana):
    result = push(grafana.url, DB, token=grafana.token)
    assert result.grafana_version == "11.6.0"
    assert result.actions == {"datasource": "created", "folder": "created",
                              **{uid: "created" for uid in boards.boards_panels()}}
    ds = grafana.datasources[boards.DATASOURCE_UID]
    assert (ds["type"], ds["url"], ds["user"], ds["jsonData"]["database"], ds["jsonData"]["sslmode"]) == \
        ("grafana-postgresql-datasource", "db.internal:5432", "grafana_reader", "iotjx", "require")
    assert grafana.secrets[boards.DATASOURCE_UID] == {"password": "r3ader"}
    assert grafana.folders[boards.FOLDER_UID]["title"] == boards.FOLDER_TITLE
    generated = {json.loads(t)["uid"]: json.loads(t) for t in boards.generate().values()}
    assert set(grafana.dashboards) == set(generated)
    for uid, stored in grafana.dashboards.items():
        assert stored["folderUid"] == boards.FOLDER_UID
        board = {k: v for k, v in stored["dashboard"].items() if k not in ("id", "version")}
        assert board == generated[uid]


def test_second_push_writes_nothing(grafana):
    push(grafana.url, DB, token=grafana.token)
    grafana.requests.clear()
    result = push(grafana.url, DB, token=grafana.token)
    assert set(result.actions.values()) == {"unchanged"} and not result.changed
    assert grafana.writes() == []
    assert all(d["dashboard"]["version"] == 1 for d in grafana.dashboards.values())


def test_a_changed_board_or_database_is_updated_alone(grafana):
    push(grafana.url, DB, user=grafana.user, password=grafana.password)      # basic auth works too
    files = boards.generate()
    name = "iotjx-water.json"
    changed = json.loads(files[name])
    changed["title"] = "iotjx · Water (renamed)"
    files[name] = json.dumps(changed)
    grafana.requests.clear()
    result = push(grafana.url, DB.replace("db.internal", "db2.internal"), token=grafana.token, boards_json=files)
    assert result.actions["iotjx-water"] == "updated" and result.actions["datasource"] == "updated"
    assert {k for k, v in result.actions.items() if v != "unchanged"} == {"iotjx-water", "datasource"}
    assert grafana.dashboards["iotjx-water"]["dashboard"]["version"] == 2
    assert grafana.dashboards["iotjx-water"]["dashboard"]["title"] == "iotjx · Water (renamed)"
    assert grafana.datasources[boards.DATASOURCE_UID]["url"] == "db2.internal:5432"
    assert grafana.writes() == [("PUT", f"/api/datasources/uid/{boards.DATASOURCE_UID}"), ("POST", "/api/dashboards/db")]


def test_wrong_credentials_are_a_clear_error(grafana):
    with pytest.raises(PushError, match=r"refused the credentials \(401\).*IOTJX_GRAFANA_TOKEN"):
        push(grafana.url, DB, token="glsa_wrong")
    with pytest.raises(PushError, match=r"401"):
        push(grafana.url, DB, user="admin", password="wrong")
    with pytest.raises(PushError, match=r"403.*Editor or Admin"):
        push(grafana.url, DB, token=grafana.viewer_token)
    assert not grafana.datasources and not grafana.folders and not grafana.dashboards


def test_an_unreachable_grafana_is_a_clear_error():
    with socket.socket() as s:                      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PushError, match=rf"Grafana at http://127.0.0.1:{port} is unreachable"):
        push(f"http://127.0.0.1:{port}", DB, token="x", timeout=2)


def test_the_data_source_from_a_database_url():
    ds = datasource_from_url("postgresql://reader:p%40ss%2Fw@10.0.0.5/iotjx")
    assert (ds["url"], ds["user"], ds["secureJsonData"], ds["jsonData"]["database"], ds["jsonData"]["sslmode"]) == \
        ("10.0.0.5:5432", "reader", {"password": "p@ss/w"}, "iotjx", "disable")
    assert ds["jsonData"]["timescaledb"] is True and ds["uid"] == boards.DATASOURCE_UID


def test_a_bad_database_url_is_refused_before_anything_is_written(grafana):
    with pytest.raises(PushError, match="postgresql://user:password@host:port/db"):
        push(grafana.url, "mysql://x@y/z", token=grafana.token)
    assert grafana.writes() == []


def test_cli_push_and_its_errors(grafana, monkeypatch):
    from iotjx.cli import app
    from iotjx.settings import get_settings

    monkeypatch.setenv("IOTJX_GRAFANA_URL", grafana.url)
    monkeypatch.setenv("IOTJX_GRAFANA_TOKEN", grafana.token)
    monkeypatch.setenv("IOTJX_GRAFANA_DATABASE_URL", DB)
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(app, ["grafana", "push"])
        assert out.exit_code == 0, out.output
        assert "datasource: created" in out.output and "iotjx-coverage: created" in out.output
        out = CliRunner().invoke(app, ["grafana", "push"])
        assert out.exit_code == 0 and "created" not in out.output and "updated" not in out.output
        monkeypatch.setenv("IOTJX_GRAFANA_TOKEN", "glsa_wrong")
        get_settings.cache_clear()
        out = CliRunner().invoke(app, ["grafana", "push"])
        assert out.exit_code == 1 and "refused the credentials (401)" in out.output
    finally:
        get_settings.cache_clear()
