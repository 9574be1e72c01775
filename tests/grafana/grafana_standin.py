"""A stand-in for Grafana's HTTP API, for `iotjx grafana push`: Grafana itself cannot be installed on
these machines (not in Debian's archive, no download allowed), so the few endpoints the push calls are
implemented here as Grafana's HTTP API documentation describes them (Grafana 11: "Data source API",
"Folder API", "Dashboard API", "Health API"):

* `GET /api/health` answers without credentials: {"database": "ok", "version": …};
* every other route wants `Authorization: Bearer <token>` or Basic user:password, else 401
  {"message": "Unauthorized"}; a viewer's token gets 403 on writes;
* data sources by uid: GET (404 "Data source not found"), POST /api/datasources (409 when the name or uid
  is taken), PUT /api/datasources/uid/{uid}; `secureJsonData` is kept and never returned (only
  `secureJsonFields` says which secrets are set), each update bumps `version`;
* folders by uid: GET /api/folders/{uid} (404), POST /api/folders (409 when the uid exists), PUT;
* dashboards: GET /api/dashboards/uid/{uid} → {"dashboard": …with id and version, "meta": {"folderUid"…}};
  POST /api/dashboards/db with {dashboard, folderUid, overwrite}: 400 "folder not found" for an unknown
  folder, 412 "version-mismatch" for an existing uid without `overwrite`, else stored with the next
  version and {"id", "uid", "url", "status": "success", "version"}.

Every request is recorded (`requests`) so that a test can tell what a second push did."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class GrafanaStandIn:
    def __init__(self, token: str = "glsa_test", user: str = "admin", password: str = "s3cret",
                 viewer_token: str = "glsa_viewer") -> None:
        self.token, self.user, self.password, self.viewer_token = token, user, password, viewer_token
        self.datasources: dict[str, dict] = {}
        self.secrets: dict[str, dict] = {}
        self.folders: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}           # uid -> {"dashboard": …, "folderUid": …}
        self.requests: list[tuple[str, str]] = []
        self._ids = 0
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with standin._lock:
                    standin.requests.append((method, self.path))
                    status, answer = standin.route(method, self.path, self.headers.get("Authorization"), body)
                self._answer(status, answer)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="grafana-standin", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> GrafanaStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def writes(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] in ("POST", "PUT")]

    # ---------------------------------------------------------------------------------- routing
    def _role(self, auth: str | None) -> str | None:
        if not auth:
            return None
        kind, _, value = auth.partition(" ")
        if kind == "Bearer":
            return {self.token: "admin", self.viewer_token: "viewer"}.get(value)
        if kind == "Basic":
            user, _, password = base64.b64decode(value).decode().partition(":")
            return "admin" if (user, password) == (self.user, self.password) else None
        return None

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def route(self, method: str, path: str, auth: str | None, body) -> tuple[int, object]:
        path = path.split("?", 1)[0]
        if method == "GET" and path == "/api/health":
            return 200, {"commit": "standin", "database": "ok", "version": "11.6.0"}
        role = self._role(auth)
        if role is None:
            return 401, {"message": "Unauthorized"}
        if method != "GET" and role != "admin":
            return 403, {"message": "Permission denied"}
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "datasources"]:
            return self._datasources(method, parts[2:], body)
        if parts[:2] == ["api", "folders"]:
            return self._folders(method, parts[2:], body)
        if parts[:2] == ["api", "dashboards"]:
            return self._dashboards(method, parts[2:], body)
        return 404, {"message": "Not found"}

    def _public(self, ds: dict) -> dict:
        return {**ds, "secureJsonFields": {k: True for k in self.secrets.get(ds["uid"], {})}}

    def _datasources(self, method: str, rest: list[str], body) -> tuple[int, object]:
        if method == "GET" and len(rest) == 2 and rest[0] == "uid":
            ds = self.datasources.get(rest[1])
            return (200, self._public(ds)) if ds else (404, {"message": "Data source not found"})
        if method == "POST" and not rest:
            if body.get("uid") in self.datasources or any(d["name"] == body.get("name") for d in self.datasources.values()):
                return 409, {"message": "data source with the same name already exists"}
            ds = {k: v for k, v in body.items() if k != "secureJsonData"}
            ds.update(id=self._next_id(), orgId=1, version=1, readOnly=False)
            self.datasources[ds["uid"]] = ds
            self.secrets[ds["uid"]] = dict(body.get("secureJsonData") or {})
            return 200, {"datasource": self._public(ds), "id": ds["id"], "message": "Datasource added", "name": ds["name"]}
        if method == "PUT" and len(rest) == 2 and rest[0] == "uid":
            old = self.datasources.get(rest[1])
            if old is None:
                return 404, {"message": "Data source not found"}
            ds = {k: v for k, v in body.items() if k != "secureJsonData"}
            ds.update(id=old["id"], orgId=1, uid=rest[1], version=old["version"] + 1, readOnly=False)
            self.datasources[rest[1]] = ds
            self.secrets[rest[1]].update(body.get("secureJsonData") or {})
            return 200, {"datasource": self._public(ds), "id": ds["id"], "message": "Datasource updated", "name": ds["name"]}
        return 405, {"message": "Method not allowed"}

    def _folders(self, method: str, rest: list[str], body) -> tuple[int, object]:
        if method == "GET" and len(rest) == 1:
            f = self.folders.get(rest[0])
            return (200, f) if f else (404, {"message": "folder not found"})
        if method == "POST" and not rest:
            uid = body.get("uid") or f"f{self._next_id()}"
            if uid in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            f = {"id": self._next_id(), "uid": uid, "title": body["title"], "url": f"/dashboards/f/{uid}", "version": 1}
            self.folders[uid] = f
            return 200, f
        if method == "PUT" and len(rest) == 1 and rest[0] in self.folders:
            f = self.folders[rest[0]]
            f.update(title=body.get("title", f["title"]), version=f["version"] + 1)
            return 200, f
        return 405, {"message": "Method not allowed"}

    def _dashboards(self, method: str, rest: list[str], body) -> tuple[int, object]:
        if method == "GET" and len(rest) == 2 and rest[0] == "uid":
            d = self.dashboards.get(rest[1])
            if d is None:
                return 404, {"message": "Dashboard not found"}
            return 200, {"dashboard": d["dashboard"], "meta": {"folderUid": d["folderUid"], "slug": rest[1],
                                                               "version": d["dashboard"]["version"]}}
        if method == "POST" and rest == ["db"]:
            board, folder = dict(body["dashboard"]), body.get("folderUid", "")
            if folder and folder not in self.folders:
                return 400, {"message": "folder not found", "status": "not-found"}
            old = self.dashboards.get(board.get("uid"))
            if old is not None and not body.get("overwrite"):
                return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
            board["id"] = old["dashboard"]["id"] if old else self._next_id()
            board["version"] = old["dashboard"]["version"] + 1 if old else 1
            self.dashboards[board["uid"]] = {"dashboard": board, "folderUid": folder}
            return 200, {"id": board["id"], "uid": board["uid"], "url": f"/d/{board['uid']}", "status": "success",
                         "version": board["version"], "slug": board["uid"]}
        return 405, {"message": "Method not allowed"}
