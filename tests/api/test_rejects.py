"""GET /rejects and POST /rejects/redecode against the real database: frames rejected by a misconfigured
model (a meter sending the CJ/T 188 DI high byte first, registered with a low-first model) and by an
unknown device, the registry fixed, re-decode run twice: each frame stored once, and the readings,
rollups and liveness equal to those of a twin device that received the same frames live through the
gateway's pipeline."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

import decoders
from api.app import create_app
from ingest.pipeline import Pipeline
from ingest.redecode import RejectFilter, redecode
from ingest.registry import DeviceRegistry
from ingest.writer import Writer
from iotjx.db import connect
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink
from tests.api.conftest import key_id
from tests.helpers import bearer, walk_pages

NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(hours=3)
WRONG, TWIN, LATE, LATE_TWIN = "869975031000001", "869975031000002", "869975031000003", "869975031000004"
N_WRONG, N_LATE = 10, 8
GARBAGE = [bytes.fromhex("6810"), bytes.fromhex("fefe68")]         # rejected whatever the model


def _frame(k: int, di_order: str) -> bytes:
    return decoders.encode("cjt188", {"meter_address": f"{7800000000 + k:014d}", "flow_m3": 100 + k * 1.25,
                                      "status": k % 4, "meter_time": T0 + timedelta(minutes=k)},
                           {"di_order": di_order})


def _uplinks(device: str, frames: list[bytes], start: datetime) -> list[Uplink]:
    return [Uplink(device_id=device, payload=f, transport="mqtt", received_at=(start + timedelta(minutes=k)).timestamp())
            for k, f in enumerate(frames)]


def _record(device: str, model: str, city: str, site: str) -> DeviceRecord:
    return DeviceRecord(device_id=device, model=model, network="nbiot", city=city, site_kind="residential",
                        site_name=site, installed_at=T0 - timedelta(days=1))


@pytest.fixture
def story(db_url):
    """WRONG (Nanchang) is registered low-first but sends high-first frames, TWIN (Nanchang) is registered
    right and gets the same frames; LATE is not registered yet, LATE_TWIN (Yingtan) gets its frames."""
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [_record(WRONG, "cjt188-nb-water-std", "Nanchang", "红谷滩小区"),
                                _record(TWIN, "cjt188-nb-water-90-1f", "Nanchang", "青山湖小区"),
                                _record(LATE_TWIN, "cjt188-nb-water-std", "Yingtan", "龙岗小区")])
    high = [_frame(k, "high_first") for k in range(N_WRONG)]
    low = [_frame(100 + k, "low_first") for k in range(N_LATE)]
    pipeline = Pipeline(DeviceRegistry(lambda: connect(db_url)), Writer(lambda: connect(db_url)))
    pipeline.process(_uplinks(WRONG, high + GARBAGE, T0) + _uplinks(TWIN, high, T0)
                     + _uplinks(LATE, low, T0 + timedelta(hours=1)) + _uplinks(LATE_TWIN, low, T0 + timedelta(hours=1)))
    with psycopg.connect(db_url) as conn:
        counts = dict(conn.execute("SELECT device_id, count(*) FROM rejected_uplinks GROUP BY 1").fetchall())
    assert counts == {WRONG: N_WRONG + len(GARBAGE), LATE: N_LATE}
    return db_url


def _fix(db_url: str) -> None:
    """The registry fixed: WRONG gets the high-first model, LATE is registered (Yingtan)."""
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE devices SET model = 'cjt188-nb-water-90-1f' WHERE device_id = %s", (WRONG,))
        register_devices(conn, [_record(LATE, "cjt188-nb-water-std", "Yingtan", "月湖小区")])


def _readings(conn, device: str) -> list[tuple]:
    return conn.execute("""SELECT time, meter_address, meter_type, flow_m3, settlement_flow_m3, meter_time, status,
                                  valve, battery_low, transport FROM water_readings WHERE device_id = %s
                           ORDER BY time, meter_address""", (device,)).fetchall()


def _columns(conn, table: str, without: set[str]) -> list[str]:
    return [c for (c,) in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                                       "ORDER BY ordinal_position", (table,)) if c not in without]


def _rollups(conn, device: str) -> tuple[list[tuple], list[tuple]]:
    """The device's day rollup rows and its site's quarter-hour rows, without their keys."""
    day = _columns(conn, "rollup_water_day", {"device_key"})
    site = _columns(conn, "rollup_water_site_15m", {"site_id"})
    days = conn.execute(f"SELECT {', '.join('r.' + c for c in day)} FROM rollup_water_day r "
                        "JOIN devices d ON d.device_key = r.device_key WHERE d.device_id = %s ORDER BY 1", (device,))
    quarters = conn.execute(f"SELECT {', '.join('r.' + c for c in site)} FROM rollup_water_site_15m r "
                            "JOIN devices d ON d.site_id = r.site_id WHERE d.device_id = %s ORDER BY 1", (device,))
    return days.fetchall(), quarters.fetchall()


def _liveness(conn, device: str) -> tuple:
    return conn.execute("SELECT first_seen, last_seen, uplinks FROM device_state WHERE device_id = %s",
                        (device,)).fetchone()


def _post(client: TestClient, key: str, body: dict | None = None):
    return client.post("/rejects/redecode", json=body or {}, headers=bearer(key))


def _wait(client: TestClient, key: str, job_id: int) -> dict:
    """The job once it ended (the API's runner thread runs it)."""
    for _ in range(1200):
        job = client.get(f"/jobs/{job_id}", headers=bearer(key))
        assert job.status_code == 200, job.text
        if job.json()["state"] in ("done", "failed"):
            return job.json()
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end: {job.json()}")


def _run(client: TestClient, key: str, body: dict | None = None) -> dict:
    """POST a re-decode (202, Location of its job) and the job once it ended, done."""
    answer = _post(client, key, body)
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/jobs/{answer.json()['job_id']}"
    assert answer.json()["state"] in ("queued", "running", "done")
    job = _wait(client, key, answer.json()["job_id"])
    assert job["state"] == "done" and job["error"] is None, job
    return job


def test_redecode_twice_stores_each_frame_once_as_a_live_uplink_would(story, settings, keys):
    db_url = story
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        before = _run(client, keys.admin)              # nothing fixed yet: every frame still rejected
        assert before["stored"] == 0 and before["examined"] == N_WRONG + N_LATE + len(GARBAGE)
        still = {r["reason"]: r["count"] for r in before["still_rejected"]}
        assert still["unsupported"] == N_WRONG and still["unknown_device"] == N_LATE
        assert before["still_rejected_total"] == N_WRONG + N_LATE + len(GARBAGE)

        _fix(db_url)
        first = _run(client, keys.admin)
        second = _run(client, keys.admin)
    assert (first["examined"], first["stored"]) == (N_WRONG + N_LATE + len(GARBAGE), N_WRONG + N_LATE)
    assert sum(r["count"] for r in first["still_rejected"]) == len(GARBAGE) == first["still_rejected_total"]
    assert (second["examined"], second["stored"]) == (len(GARBAGE), 0)      # only the garbage is left to try
    assert {j["started_by"] for j in (before, first, second)} == {f"key:{key_id(keys.admin)}"}

    with psycopg.connect(db_url) as conn:
        # Each frame stored once, equal to the twin's live readings, rollups and liveness.
        assert len(_readings(conn, WRONG)) == N_WRONG and len(_readings(conn, LATE)) == N_LATE
        assert _readings(conn, WRONG) == _readings(conn, TWIN)
        assert _readings(conn, LATE) == _readings(conn, LATE_TWIN)
        assert _rollups(conn, WRONG) == _rollups(conn, TWIN) and _rollups(conn, WRONG)[0]
        assert _rollups(conn, LATE) == _rollups(conn, LATE_TWIN) and _rollups(conn, LATE)[0]
        first_seen, last_seen, uplinks = _liveness(conn, WRONG)
        twin = _liveness(conn, TWIN)
        assert (first_seen, last_seen, uplinks) == twin
        assert _liveness(conn, LATE) == _liveness(conn, LATE_TWIN)
        # The logs stay truthful: the reject rows and their raw-log rows are still there; the re-decoded
        # frames gained a stored raw row naming their reject; the rejects are marked by whom.
        raw = dict(conn.execute("""SELECT outcome, count(*) FROM raw_uplinks WHERE device_id IN (%s, %s)
                                   GROUP BY 1""", (WRONG, LATE)).fetchall())
        assert raw == {"rejected:unsupported": N_WRONG, "rejected:unknown_device": N_LATE, "stored": N_WRONG + N_LATE,
                       **{k: v for k, v in raw.items() if k.startswith("rejected:") and k not in
                          ("rejected:unsupported", "rejected:unknown_device")}}
        marked = conn.execute("""SELECT count(*) FROM raw_uplinks r JOIN rejected_uplinks j
                                 ON j.reject_id = (r.meta->>'redecoded_from')::bigint
                                 AND j.device_id = r.device_id AND j.payload = r.payload AND j.received_at = r.received_at
                                 WHERE r.outcome = 'stored'""").fetchone()[0]
        assert marked == N_WRONG + N_LATE
        by = conn.execute("SELECT redecoded_by, count(*) FROM rejected_uplinks GROUP BY 1 ORDER BY 1 NULLS LAST").fetchall()
        assert by == [(f"key:{key_id(keys.admin)}", N_WRONG + N_LATE), (None, len(GARBAGE))]
        audit = conn.execute("SELECT change, status FROM audit_log WHERE route = '/rejects/redecode' "
                             "ORDER BY audit_id").fetchall()
        assert [(a[0]["job_id"], a[1]) for a in audit] == [(j["job_id"], 202) for j in (before, first, second)]
        # The jobs' counts, recounted from the marks the re-decodes left.
        jobs = conn.execute("SELECT state, stored, examined FROM jobs ORDER BY job_id").fetchall()
        assert jobs == [("done", 0, N_WRONG + N_LATE + len(GARBAGE)), ("done", N_WRONG + N_LATE, N_WRONG + N_LATE + len(GARBAGE)),
                        ("done", 0, len(GARBAGE))]
        assert sum(j[1] for j in jobs) == conn.execute(
            "SELECT count(*) FROM rejected_uplinks WHERE redecoded_at IS NOT NULL").fetchone()[0]


def test_two_redecodes_at_once_store_each_frame_once(story):
    db_url = story
    _fix(db_url)
    results = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        results.append(redecode(lambda: connect(db_url), RejectFilter(), actor="test", chunk=3))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(r.stored for r in results) == N_WRONG + N_LATE
    with psycopg.connect(db_url) as conn:
        assert _readings(conn, WRONG) == _readings(conn, TWIN)
        assert _readings(conn, LATE) == _readings(conn, LATE_TWIN)
        assert conn.execute("SELECT count(*) FROM rejected_uplinks WHERE redecoded_at IS NOT NULL").fetchone()[0] \
            == N_WRONG + N_LATE


def test_limit_and_after_continue_a_redecode(story):
    db_url = story
    _fix(db_url)
    first = redecode(lambda: connect(db_url), RejectFilter(), actor="test", limit=5, chunk=2)
    assert (first.examined, first.more) == (5, True)
    rest = redecode(lambda: connect(db_url), RejectFilter(), actor="test", after=first.last_reject_id)
    assert rest.more is False and first.stored + rest.stored == N_WRONG + N_LATE
    with psycopg.connect(db_url) as conn:
        assert len(_readings(conn, WRONG)) == N_WRONG and len(_readings(conn, LATE)) == N_LATE


def test_a_city_scoped_admin_redecodes_its_cities_only(story, settings, keys):
    db_url = story
    _fix(db_url)                     # WRONG is in Nanchang, LATE now in Yingtan
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert _post(client, keys.operator).status_code == 403
        assert _post(client, keys.viewer).status_code == 403
        scoped = _run(client, keys.nanchang_admin)
        assert (scoped["examined"], scoped["stored"]) == (N_WRONG + len(GARBAGE), N_WRONG)
        assert [c["city"] for c in scoped["cities"]] == [360100] and scoped["cities"][0]["city_name_en"] == "Nanchang"
        whole = _run(client, keys.admin, {"reason": "unknown_device"})
        assert (whole["examined"], whole["stored"]) == (N_LATE, N_LATE)
        assert whole["cities"] is None and whole["params"]["reason"] == "unknown_device"
        # The scoped key sees its own job only; the whole-province key sees both.
        mine = client.get("/jobs", headers=bearer(keys.nanchang_admin)).json()["items"]
        assert [j["job_id"] for j in mine] == [scoped["job_id"]]
        assert client.get(f"/jobs/{whole['job_id']}", headers=bearer(keys.nanchang_admin)).status_code == 404
        every = client.get("/jobs", headers=bearer(keys.admin)).json()["items"]
        assert [j["job_id"] for j in every] == [whole["job_id"], scoped["job_id"]]
        assert client.get("/jobs", headers=bearer(keys.operator)).status_code == 403
    with psycopg.connect(db_url) as conn:
        assert len(_readings(conn, WRONG)) == N_WRONG and len(_readings(conn, LATE)) == N_LATE


def _sql_rejects(db_url: str, where: str = "true", params: tuple = ()) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(f"SELECT reject_id, device_id, reason, encode(payload, 'hex') FROM rejected_uplinks "
                            f"WHERE {where} ORDER BY received_at DESC, reject_id DESC", params).fetchall()


def _walk(client: TestClient, key: str, params: dict) -> list[tuple]:
    return [(r["reject_id"], r["device_id"], r["reason"], r["payload_hex"])
            for r in walk_pages(client, "/rejects", key, params, max_pages=100)]


def test_list_filters_pages_and_city_scope(story, settings, keys):
    db_url = story
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert _walk(client, keys.viewer, {"limit": 7}) == _sql_rejects(db_url)
        assert _walk(client, keys.viewer, {"reason": "unknown_device"}) == _sql_rejects(db_url, "reason = 'unknown_device'")
        assert _walk(client, keys.viewer, {"device": WRONG, "limit": 3}) == _sql_rejects(db_url, "device_id = %s", (WRONG,))
        cut = T0 + timedelta(minutes=5)
        assert _walk(client, keys.viewer, {"since": cut.isoformat(), "until": (T0 + timedelta(hours=1, minutes=3)).isoformat()}) \
            == _sql_rejects(db_url, "received_at >= %s AND received_at < %s", (cut, T0 + timedelta(hours=1, minutes=3)))
        assert _walk(client, keys.viewer, {"model": "cjt188-nb-water-std", "codec": "cjt188"}) \
            == _sql_rejects(db_url, "device_id = %s AND codec = 'cjt188'", (WRONG,))
        # Nanchang's key: WRONG's rejects; never the unknown device's.
        assert _walk(client, keys.nanchang_viewer, {}) == _sql_rejects(db_url, "device_id = %s", (WRONG,))
        late = _sql_rejects(db_url, "device_id = %s", (LATE,))[0][0]
        assert client.get(f"/rejects/{late}", headers=bearer(keys.nanchang_viewer)).status_code == 404
        one = client.get(f"/rejects/{late}", headers=bearer(keys.viewer)).json()
        assert (one["device_id"], one["reason"], one["city"], one["redecoded_at"]) == (LATE, "unknown_device", None, None)
        # Once LATE is registered in Yingtan its rejects are Yingtan's: still not Nanchang's.
        _fix(db_url)
        assert client.get(f"/rejects/{late}", headers=bearer(keys.viewer)).json()["city"] == 360600
        assert client.get(f"/rejects/{late}", headers=bearer(keys.nanchang_viewer)).status_code == 404
        for bad in ({"since": NOW.isoformat(), "until": T0.isoformat()}, {"reason": "nonsense"},
                    {"cursor": "bm90LWEtY3Vyc29y"}, {"limit": 0}, {"device": "x\x01"}, {"colour": "red"}):
            answer = client.get("/rejects", params=bad, headers=bearer(keys.viewer))
            assert answer.status_code == 422, (bad, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
        bad = client.post("/rejects/redecode", json={"since": NOW.isoformat(), "until": T0.isoformat()},
                          headers=bearer(keys.admin))
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


def test_payload_hex_is_bounded(db_url, settings, keys):
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO rejected_uplinks (received_at, device_id, transport, payload, reason) "
                     "VALUES (now(), 'x', 'http', %s, 'too_large')", (bytes(range(256)) * 8,))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        item = client.get("/rejects", headers=bearer(keys.viewer)).json()["items"][0]
    assert item["payload_bytes"] == 2048 and item["payload_truncated"] is True
    assert item["payload_hex"] == (bytes(range(256)) * 4).hex()
