"""`iotjx grafana push`: the data source, the folder and the five boards uploaded to a running Grafana
through its HTTP API with grafana-client, idempotently.

Everything has a fixed uid, so a push creates what is missing and updates what differs: the data
source by uid (GET, then POST /api/datasources or PUT /api/datasources/uid/…), the folder by uid, each
board by POST /api/dashboards/db with `overwrite` after comparing it with what Grafana holds (an
unchanged board is not posted: no new version in Grafana's history).  `/api/health` is asked first, so
an unreachable Grafana is one clear error; a 401 or 403 names the credentials to check."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError

from iotjx.grafana import boards
from iotjx.grafana.provisioning import datasource


class PushError(Exception):
    """Grafana could not be reached, refused the credentials, or refused a request."""


@dataclass(slots=True)
class PushResult:
    """What a push did: per object ('datasource', 'folder', each board uid) `created`, `updated` or `unchanged`."""

    grafana_version: str | None = None
    actions: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(a != "unchanged" for a in self.actions.values())


def datasource_from_url(database_url: str) -> dict:
    """The data source for a database URL (postgresql://user:password@host:port/db?sslmode=…)."""
    u = urlsplit(database_url)
    if u.scheme not in ("postgresql", "postgres") or not u.hostname:
        raise PushError(f"the database URL for Grafana must be postgresql://user:password@host:port/db, got {u.scheme}://…")
    query = dict(p.split("=", 1) for p in u.query.split("&") if "=" in p)
    return datasource(f"{u.hostname}:{u.port or 5432}", unquote((u.path or "/").lstrip("/")) or "postgres",
                      unquote(u.username or ""), unquote(u.password or ""), query.get("sslmode", "disable"))


def _api(url: str, token: str | None, user: str | None, password: str | None, timeout: float) -> GrafanaApi:
    credential = token if token else ((user, password or "") if user else None)
    return GrafanaApi.from_url(url, credential=credential, timeout=timeout)


def _same(current: dict, wanted: dict) -> bool:
    """A data source as Grafana returns it equals the one we send (secrets are never returned: the
    password is always sent again on a change, and a change of password alone is not seen)."""
    return all(current.get(k) == wanted[k] for k in _COMPARED) and \
        all((current.get("jsonData") or {}).get(k) == v for k, v in wanted["jsonData"].items())


_COMPARED = ("name", "type", "access", "url", "user", "isDefault")   # what GET /api/datasources/uid/… returns as sent


def push(url: str, database_url: str, *, token: str | None = None, user: str | None = None,
         password: str | None = None, timeout: float = 10.0, boards_json: dict[str, str] | None = None) -> PushResult:
    """Upload the data source, folder and boards; see the module docstring."""
    api = _api(url, token, user, password, timeout)
    result = PushResult()
    try:
        health = api.client.GET("/health")
        result.grafana_version = (health or {}).get("version")
        wanted = datasource_from_url(database_url)
        result.actions["datasource"] = _upsert_datasource(api, wanted)
        result.actions["folder"] = _upsert_folder(api)
        for name, text in sorted((boards_json or boards.generate()).items()):
            board = json.loads(text)
            result.actions[board["uid"]] = _upsert_board(api, board)
    except GrafanaUnauthorizedError as exc:
        raise PushError(f"Grafana at {url} refused the credentials (401): check IOTJX_GRAFANA_TOKEN, or "
                        f"IOTJX_GRAFANA_USER and IOTJX_GRAFANA_PASSWORD") from exc
    except GrafanaClientError as exc:
        if exc.status_code == 403:
            raise PushError(f"Grafana at {url} denied the request (403): the token's or user's role must be "
                            f"Editor or Admin") from exc
        raise PushError(f"Grafana at {url} refused a request ({exc.status_code}): {exc.message}") from exc
    except GrafanaException as exc:
        raise PushError(f"Grafana at {url} did not answer properly: {exc.message}") from exc
    except OSError as exc:                    # requests' connection errors and timeouts are OSErrors
        raise PushError(f"Grafana at {url} is unreachable: {exc}") from exc
    return result


def _missing(exc: GrafanaClientError) -> bool:
    return exc.status_code == 404


def _upsert_datasource(api: GrafanaApi, wanted: dict) -> str:
    try:
        current = api.datasource.get_datasource_by_uid(wanted["uid"])
    except GrafanaClientError as exc:
        if not _missing(exc):
            raise
        api.datasource.create_datasource(wanted)
        return "created"
    if _same(current, wanted):
        return "unchanged"
    api.datasource.update_datasource_by_uid(wanted["uid"], wanted)
    return "updated"


def _upsert_folder(api: GrafanaApi) -> str:
    try:
        current = api.folder.get_folder(boards.FOLDER_UID)
    except GrafanaClientError as exc:
        if not _missing(exc):
            raise
        api.folder.create_folder(boards.FOLDER_TITLE, uid=boards.FOLDER_UID)
        return "created"
    if current.get("title") == boards.FOLDER_TITLE:
        return "unchanged"
    api.folder.update_folder(boards.FOLDER_UID, title=boards.FOLDER_TITLE, overwrite=True)
    return "updated"


def _comparable(board: dict) -> dict:
    return {k: v for k, v in board.items() if k not in ("id", "version")}


def _upsert_board(api: GrafanaApi, board: dict) -> str:
    try:
        current = api.dashboard.get_dashboard(board["uid"])
    except GrafanaClientError as exc:
        if not _missing(exc):
            raise
        current = None
    if current is not None and _comparable(current.get("dashboard", {})) == _comparable(board) \
            and current.get("meta", {}).get("folderUid") == boards.FOLDER_UID:
        return "unchanged"
    api.dashboard.update_dashboard({"dashboard": {**board, "id": None}, "folderUid": boards.FOLDER_UID,
                                    "overwrite": True, "message": "iotjx grafana push"})
    return "created" if current is None else "updated"
