"""GET /cities against the real database: the eleven cities with their devices counted by status, held
to a plain-SQL count; a city-scoped key sees only its cities."""

from __future__ import annotations

import psycopg
from fastapi.testclient import TestClient

from api.app import create_app
from iotjx.devices import DeviceRecord, register_devices
from tests.api.conftest import NANCHANG
from tests.helpers import bearer, walk_pages


def _devices(db_url: str) -> None:
    def r(k: int, city: str, status: str) -> DeviceRecord:
        return DeviceRecord(f"86997503{k:07d}", "cjt188-nb-water-std", city=city, site_kind="residential",
                            site_name=f"{city} 小区", status=status)
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [r(1, "Nanchang", "active"), r(2, "Nanchang", "active"), r(3, "南昌", "inactive"),
                                r(4, "Yingtan", "retired"), r(5, "361100", "active")])


def test_cities_with_device_counts_equal_a_plain_sql_count(settings, keys):
    _devices(settings.database_url)
    with psycopg.connect(settings.database_url) as conn:
        want = {code: (zh, en, {"active": 0, "inactive": 0, "retired": 0})
                for code, zh, en in conn.execute("SELECT code, name_zh, name_en FROM cities")}
        for code, status, n in conn.execute("""SELECT s.city_code, d.status, count(*) FROM devices d
                                               JOIN sites s USING (site_id) GROUP BY 1, 2"""):
            want[code][2][status] = n
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        body = client.get("/cities", headers=bearer(keys.viewer)).json()
        assert body["next_cursor"] is None and len(body["items"]) == 11
        assert {c["city"]: (c["name_zh"], c["name_en"], c["devices"]) for c in body["items"]} == want
        assert [c["city"] for c in body["items"]] == sorted(want)
        assert want[NANCHANG][2] == {"active": 2, "inactive": 1, "retired": 0}
        # paged: the same cities, in order
        assert walk_pages(client, "/cities", keys.viewer, {"limit": 4}) == body["items"]
        scoped = client.get("/cities", headers=bearer(keys.nanchang_viewer)).json()["items"]
        assert [c["city"] for c in scoped] == [NANCHANG] and scoped[0]["devices"]["active"] == 2
        assert client.get("/cities").status_code == 401
        assert client.get("/cities", params={"cursor": "x"}, headers=bearer(keys.viewer)).status_code == 422
        assert client.get("/cities", params={"city": 360100}, headers=bearer(keys.viewer)).status_code == 422
