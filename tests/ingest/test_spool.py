"""The durable spool: the journal format, torn and damaged records, fsync before ack, replay in order
(also after a restart), exactly once across a crash during replay, backpressure when full, and a
slow database.  Real files, real fsync, the real PostgreSQL; an outage is a real refused connection
(a port nothing listens on), so psycopg raises what it raises in production."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from iotjx.broker import free_port
from iotjx.db import connect
from iotjx.model import Uplink
from ingest import spool as spool_module
from ingest.metrics import render_prometheus
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.spool import MAGIC, Spool, SpoolFull, decode_segment, encode_record
from ingest.writer import Writer
from simulators.water import make_meters
from tests.helpers import register_fleet, wait_for_count, wait_until


# ---------------------------------------------------------------------------------------- format
def _uplinks() -> list[Uplink]:
    return [
        Uplink("869975031234567", bytes(range(256)) * 3, "mqtt", 1_795_000_000.125, {"topic": "t/up/869975031234567"}),
        Uplink("", b'{"IMEI":"1","payload":{"APPdata":"aGk="}}', "http", 1_795_000_001.5,
               {"envelope": "ctwing", "radio": {"rsrp": -95.5, "sinr": 3}, "peer": ["10.0.0.1", 443]}),
        Uplink("水表-01", b"", "coap", 0.0, {}),
        Uplink("big", os.urandom(200_000), "coap", 1.0, {"content_format": 42}),
    ]


def _same(a: Uplink, b: Uplink) -> bool:
    return (a.device_id, a.payload, a.transport, a.received_at, a.meta) == (b.device_id, b.payload, b.transport,
                                                                            b.received_at, b.meta)


def test_journal_round_trip_and_a_reopened_spool_finds_what_was_written(tmp_path):
    spool = Spool(tmp_path / "j")
    sent = _uplinks()
    seg1 = spool.append(7, sent[:2])
    seg2 = spool.append(9, sent[2:])
    assert [s.seq for s in spool.segments()] == [7, 9]
    assert seg1.path.stat().st_size == seg1.size and seg1.path.read_bytes().startswith(MAGIC)
    got = spool.read(seg1).uplinks + spool.read(seg2).uplinks
    assert len(got) == len(sent) and all(_same(a, b) for a, b in zip(got, sent, strict=True))
    status = spool.status()
    assert (status.segments, status.uplinks, status.bytes) == (2, 4, seg1.size + seg2.size)
    assert status.oldest_received_at == sent[0].received_at
    spool.close()
    again = Spool(tmp_path / "j")               # a restart: the scan counts records without decoding
    assert [(s.seq, s.uplinks, s.size, s.first_received_at) for s in again.segments()] == \
        [(7, 2, seg1.size, sent[0].received_at), (9, 2, seg2.size, 0.0)]
    assert again.last_seq() == 9
    again.remove(again.segments()[:1])
    assert [s.seq for s in again.segments()] == [9] and not seg1.path.exists()
    again.close()


def test_a_torn_last_record_is_detected_and_skipped_with_a_log_line(tmp_path, caplog):
    sent = _uplinks()[:3]
    whole = MAGIC + b"".join(encode_record(u) for u in sent)
    last = len(encode_record(sent[-1]))
    for cut in (1, 4, 8, 9, last // 2, last - 1):          # inside the length, the CRC, the body
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ingest.spool"):
            result = decode_segment(whole[:-cut], "seg")
        assert [u.device_id for u in result.uplinks] == [u.device_id for u in sent[:-1]], cut
        assert result.torn_bytes == last - cut and result.corrupt_records == 0
        assert "torn last record" in caplog.text
    # A crash after the file grew but before its data reached the disk leaves zeros.
    result = decode_segment(whole[:-last] + bytes(last), "seg")
    assert len(result.uplinks) == 2 and result.torn_bytes == last
    # A record whose body was cut and then zero-filled fails its CRC: still the torn tail.
    result = decode_segment(whole[:-10] + bytes(10), "seg")
    assert len(result.uplinks) == 2 and result.torn_bytes == last and result.corrupt_records == 0
    # Through the Spool: a torn segment on disk from a crashed run.
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / f"{3:020d}.journal").write_bytes(whole[:-5])
    spool = Spool(tmp_path / "j")
    assert spool.segments()[0].uplinks == 2
    assert len(spool.read(spool.segments()[0]).uplinks) == 2
    spool.close()


def test_a_damaged_record_before_the_end_is_skipped_loudly_and_the_file_kept(tmp_path, caplog):
    spool = Spool(tmp_path / "j")
    sent = _uplinks()[:3]
    seg = spool.append(1, sent)
    data = bytearray(seg.path.read_bytes())
    data[len(MAGIC) + 8 + 20] ^= 0xFF                       # inside the first record's body
    seg.path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="ingest.spool"):
        result = spool.read(seg)
    assert [u.device_id for u in result.uplinks] == [u.device_id for u in sent[1:]]
    assert result.corrupt_records == 1 and "fails its CRC" in caplog.text
    assert seg.path.with_suffix(".corrupt").read_bytes() == bytes(data)
    spool.remove([seg])
    assert seg.path.with_suffix(".corrupt").exists()      # replaying removes the segment, not the evidence
    spool.close()


def test_the_spool_refuses_past_its_limit_but_never_when_empty_and_one_process_per_directory(tmp_path):
    spool = Spool(tmp_path / "j", max_bytes=1000)
    big = [Uplink("d", b"x" * 5000, "mqtt", 1.0)]
    spool.append(1, big)                                    # alone it is taken, or nothing could ever be
    with pytest.raises(SpoolFull):
        spool.append(2, [Uplink("d", b"y", "mqtt", 2.0)])
    assert [s.seq for s in spool.segments()] == [1] and len(list((tmp_path / "j").glob("*.journal"))) == 1
    with pytest.raises(RuntimeError, match="in use"):
        Spool(tmp_path / "j")
    spool.close()
    Spool(tmp_path / "j").close()


# ---------------------------------------------------------------------------------------- pipeline
class Database:
    """The database as the gateway reaches it: up (the test database) or down (a refused port)."""

    def __init__(self, url: str, up: bool = True) -> None:
        info = psycopg.conninfo.conninfo_to_dict(url)
        info.update(host="127.0.0.1", port=str(free_port()))
        self.good, self.bad, self.up = url, psycopg.conninfo.make_conninfo(**info), up

    def connect(self) -> psycopg.Connection:
        return connect(self.good if self.up else self.bad, application_name="iotjx-test")


class Acks:
    """Records every ack (outcome per uplink), and can run a check inside the ack callback."""

    def __init__(self, check=None) -> None:
        self.lock = threading.Lock()
        self.by_key: dict[tuple[str, bytes], list[str]] = {}
        self.check = check

    def ack_for(self, u_key: tuple[str, bytes]):
        def ack(outcome) -> None:
            if self.check is not None:
                self.check(u_key, outcome)
            with self.lock:
                self.by_key.setdefault(u_key, []).append(outcome.status)
        return ack

    def statuses(self) -> Counter:
        with self.lock:
            return Counter(s for v in self.by_key.values() for s in v)


def _pipeline(db: Database, spool_dir, **kwargs) -> Pipeline:
    return Pipeline(DeviceRegistry(db.connect), Writer(db.connect), batch_age_s=0.05,
                    spool=Spool(spool_dir, max_bytes=kwargs.pop("max_bytes", 1 << 30)) if spool_dir else None,
                    **kwargs)


def _stream(db_url: str, n_devices: int, rounds: int, acks: Acks, seed: int = 11) -> list[Uplink]:
    """Uplinks from a registered fleet, in arrival order (received_at strictly increasing)."""
    meters = make_meters(register_fleet(db_url, n_devices, seed=seed), seed=seed)
    t0 = datetime(2026, 11, 5, tzinfo=UTC)
    base = time.time()
    out = []
    for k in range(rounds):
        for m in meters:
            frame = m.frame(t0 + timedelta(minutes=15 * k))
            out.append(Uplink(m.device_id, frame, "mqtt", base + len(out) * 1e-4, {"topic": f"t/up/{m.device_id}"},
                              ack=acks.ack_for((m.device_id, frame))))
    return out


def _stored(db_url: str) -> Counter:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT device_id, payload FROM raw_uplinks WHERE outcome = 'stored'").fetchall()
    return Counter((d, bytes(p)) for d, p in rows)


def _stored_order(db_url: str) -> list[float]:
    """received_at of the stored uplinks in the order they were written (transaction, then position)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("""SELECT extract(epoch FROM received_at) FROM raw_uplinks WHERE outcome = 'stored'
                               ORDER BY xmin::text::bigint, ctid""").fetchall()
    return [float(r[0]) for r in rows]



def _wait(predicate, timeout: float = 60.0) -> bool:
    return wait_until(predicate, timeout)


def test_an_uplink_is_acknowledged_only_after_its_record_is_fsynced(db_url, tmp_path, monkeypatch, no_thread_leaks):
    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    spool_dir = tmp_path / "spool"

    def check(key, outcome) -> None:
        assert outcome.status == "spooled"
        # The record is in a segment whose bytes and directory entry were fsync'd before this ack.
        for path in sorted(spool_dir.glob("*.journal")):
            data = path.read_bytes()
            if any((u.device_id, u.payload) == key for u in decode_segment(data).uplinks):
                synced = [p for what, p in events if what == "fsync"]
                assert str(path) in synced and str(spool_dir) in synced[synced.index(str(path)):]
                assert path.stat().st_size == len(data)
                events.append(("ack", str(path)))
                return
        raise AssertionError(f"acknowledged before its record was in the journal: {key}")

    acks = Acks(check)
    db = Database(db_url, up=False)
    uplinks = _stream(db_url, 20, 10, acks)
    pipeline = _pipeline(db, spool_dir, batch_size=37)
    pipeline.start()
    try:
        for u in uplinks:
            pipeline.submit(u)
        assert _wait(lambda: sum(acks.statuses().values()) == len(uplinks))
        assert acks.statuses() == {"spooled": len(uplinks)}
        assert pipeline.spool_status()["uplinks"] == len(uplinks) and pipeline.spool_status()["mode"] == "spooling"
        assert pipeline.counters["spooled"] == len(uplinks) and pipeline.counters["stored"] == 0
        text = render_prometheus({"gw": pipeline.metrics_snapshot()})
        on_disk = sum(p.stat().st_size for p in spool_dir.glob("*.journal"))
        for line in ('iotjx_ingest_spooled_total{gateway="gw",transport="mqtt"} 200',
                     f'iotjx_ingest_spool_uplinks{{gateway="gw"}} {len(uplinks)}',
                     f'iotjx_ingest_spool_bytes{{gateway="gw"}} {on_disk}',
                     'iotjx_ingest_spooling{gateway="gw"} 1', 'iotjx_ingest_backpressure{gateway="gw"} 0'):
            assert line in text.splitlines(), line
    finally:
        pipeline.stop()
    assert [e for e in events if e[0] == "ack"]


def test_spooled_uplinks_are_replayed_in_order_when_the_database_returns(db_url, tmp_path, no_thread_leaks):
    acks = Acks()
    db = Database(db_url, up=False)
    uplinks = _stream(db_url, 50, 40, acks)                 # 2,000 uplinks
    pipeline = _pipeline(db, tmp_path / "spool", batch_size=150)
    pipeline.start()
    try:
        for u in uplinks[:1200]:
            pipeline.submit(u)
        assert _wait(lambda: acks.statuses()["spooled"] == 1200)
        db.up = True                                        # the database is back: replay, then direct
        for u in uplinks[1200:]:
            pipeline.submit(u)
        assert wait_for_count(db_url, "SELECT count(*) FROM water_readings", len(uplinks)) == len(uplinks)
        assert _wait(lambda: pipeline.spool_status()["mode"] == "direct")
    finally:
        pipeline.stop()
    assert _stored(db_url) == Counter((u.device_id, u.payload) for u in uplinks)
    assert _stored_order(db_url) == sorted(_stored_order(db_url))          # the spool keeps arrival order
    statuses = acks.statuses()
    assert sum(statuses.values()) == len(uplinks) and set(statuses) <= {"spooled", "stored"}
    assert all(len(v) == 1 for v in acks.by_key.values())                 # each acknowledged exactly once
    assert not list((tmp_path / "spool").glob("*.journal"))
    snap = pipeline.metrics_snapshot()
    assert snap["replayed"]["mqtt"] == statuses["spooled"] and snap["stored"]["mqtt"]["cjt188"] == len(uplinks)


def test_a_journal_left_by_a_crash_is_replayed_first_at_start_up(db_url, tmp_path, no_thread_leaks, caplog):
    acks = Acks()
    uplinks = _stream(db_url, 30, 20, acks)                 # 600
    crashed = Spool(tmp_path / "spool")                     # what a killed gateway leaves behind
    for i in range(0, 400, 100):
        crashed.append(i // 100 + 1, uplinks[i:i + 100])
    crashed.close()
    torn = tmp_path / "spool" / f"{5:020d}.journal"
    torn.write_bytes((MAGIC + b"".join(encode_record(u) for u in uplinks[400:410]))[:-3])   # died mid-write
    pipeline = _pipeline(Database(db_url), tmp_path / "spool", batch_size=100)
    with caplog.at_level(logging.WARNING):
        pipeline.start()
        try:
            for u in uplinks[409:]:                         # the torn record is redelivered by its transport
                pipeline.submit(u)
            expected = 400 + 9 + len(uplinks[409:])
            assert wait_for_count(db_url, "SELECT count(*) FROM water_readings", expected) == expected
        finally:
            pipeline.stop()
    assert _stored(db_url) == Counter((u.device_id, u.payload) for u in uplinks)
    assert _stored_order(db_url) == sorted(_stored_order(db_url))          # the old journal went first
    assert "torn last record" in caplog.text and "previous run" in caplog.text
    assert not list((tmp_path / "spool").glob("*.journal"))


def test_a_crash_between_replay_commit_and_truncation_stores_nothing_twice(db_url, tmp_path, no_thread_leaks):
    acks = Acks()
    uplinks = _stream(db_url, 25, 20, acks)                 # 500
    spool = Spool(tmp_path / "spool")
    for i in range(0, 500, 125):
        spool.append(i + 1, uplinks[i:i + 125])
    replayed = [u for s in spool.segments() for u in spool.read(s).uplinks]
    spool.close()
    # The replay committed, then the gateway died before removing the segments:
    committed = _pipeline(Database(db_url), None)
    committed.process(replayed)
    assert _stored(db_url) == Counter((u.device_id, u.payload) for u in uplinks)
    # The next start replays the same segments: every dedup key is already claimed.
    pipeline = _pipeline(Database(db_url), tmp_path / "spool", batch_size=125)
    pipeline.start()
    try:
        assert _wait(lambda: pipeline.spool_status()["mode"] == "direct")
    finally:
        pipeline.stop()
    assert _stored(db_url) == Counter((u.device_id, u.payload) for u in uplinks)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM water_readings").fetchone()[0] == 500
        assert conn.execute("SELECT count(*) FROM raw_uplinks WHERE outcome = 'duplicate'").fetchone()[0] == 500
    assert pipeline.metrics_snapshot()["duplicate"] == {"mqtt": {"cjt188": 500}}


def test_a_full_spool_stops_acknowledging_instead_of_dropping(db_url, tmp_path, no_thread_leaks, caplog):
    acks = Acks()
    db = Database(db_url, up=False)
    uplinks = _stream(db_url, 40, 50, acks)                 # 2,000 uplinks of ~30 bytes
    limit = 20_000                                          # ≈ 300 uplinks' worth of journal
    pipeline = _pipeline(db, tmp_path / "spool", batch_size=50, queue_max=100, max_bytes=limit)
    fed = threading.Event()

    def feed() -> None:
        for u in uplinks:
            pipeline.submit(u)                              # blocks: the transport is held back
        fed.set()
    feeder = threading.Thread(target=feed, name="iotjx-test-feeder")
    with caplog.at_level(logging.ERROR, logger="ingest.pipeline"):
        pipeline.start()
        try:
            feeder.start()
            assert _wait(lambda: pipeline.spool_status()["full"])
            held = sum(acks.statuses().values())
            time.sleep(1.0)                                 # nothing more is acknowledged while full
            assert sum(acks.statuses().values()) == held and not fed.is_set()
            assert held < len(uplinks) and pipeline.spool_status()["bytes"] <= limit
            assert pipeline.queue_depth <= 100
            assert caplog.text.count("BACKPRESSURE") == 1 and pipeline.counters["spool_full"] == 1
            db.up = True
            assert fed.wait(60)
            assert wait_for_count(db_url, "SELECT count(*) FROM water_readings", len(uplinks)) == len(uplinks)
        finally:
            db.up = True
            feeder.join(60)
            pipeline.stop()
    assert "backpressure over" in caplog.text
    assert _stored(db_url) == Counter((u.device_id, u.payload) for u in uplinks)
    assert all(len(v) == 1 for v in acks.by_key.values()) and len(acks.by_key) == len(uplinks)


def test_a_slow_database_sends_the_batches_behind_to_the_spool(db_url, tmp_path, no_thread_leaks):
    acks = Acks()
    uplinks = _stream(db_url, 20, 30, acks)                 # 600
    pipeline = _pipeline(Database(db_url), tmp_path / "spool", batch_size=100, slow_batch_s=1.0)
    blocker = psycopg.connect(db_url)
    pipeline.start()
    try:
        blocker.execute("LOCK TABLE water_readings IN ACCESS EXCLUSIVE MODE")   # the first COPY waits on it
        for u in uplinks:
            pipeline.submit(u)
        # While the first batch still waits, the ones behind it are spooled and acknowledged.
        assert _wait(lambda: acks.statuses()["spooled"] >= 500)
        assert acks.statuses()["stored"] == 0 and pipeline.spool_status()["mode"] == "spooling"
        blocker.rollback()
        assert wait_for_count(db_url, "SELECT count(*) FROM water_readings", 600) == 600
        assert _wait(lambda: pipeline.spool_status()["mode"] == "direct")
    finally:
        blocker.rollback()
        blocker.close()
        pipeline.stop()
    assert _stored(db_url) == Counter((u.device_id, u.payload) for u in uplinks)
    assert _stored_order(db_url) == sorted(_stored_order(db_url))
    assert all(len(v) == 1 for v in acks.by_key.values()) and len(acks.by_key) == 600


# ---------------------------------------------------------------------------------------- no schema yet
def test_a_gateway_started_before_its_schema_spools_and_replays_once_the_schema_is_applied(
        pg_admin_url, broker, tmp_path, no_thread_leaks):
    """An empty database and a schema keeper whose migrations "cannot reach" it: the gateway starts,
    takes MQTT uplinks and acknowledges them from the spool, and writes nothing — the database still
    has no table.  Once the keeper gets through (migrations, then the devices), the spool is
    replayed by itself and every uplink is stored once, equal to the reference decoder."""
    import uuid

    from decoders import decode
    from ingest.gateway import Gateway
    from iotjx.devices import register_devices
    from iotjx.runtime import SchemaKeeper, prepare_database
    from iotjx.settings import Settings
    from simulators.fleet import plan_water_fleet
    from simulators.publish import MqttPublisher

    name = f"iotjx_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(pg_admin_url)
    url = psycopg.conninfo.make_conninfo(**{**info, "dbname": name})
    try:
        settings = Settings(database_url=url, **broker.gateway_settings(), mqtt_protocol=broker.protocol,
                            mqtt_client_id=f"iotjx-test-{uuid.uuid4().hex[:8]}",
                            mqtt_topic_prefix=f"t{uuid.uuid4().hex[:6]}", batch_age_ms=50,
                            spool_dir=tmp_path / "spool")
        fleet = plan_water_fleet(5, 61)
        meters = make_meters(fleet, seed=61)
        sent = [(m.device_id, m.frame(datetime(2026, 11, 9, h, tzinfo=UTC))) for h in range(4) for m in meters]
        reachable = threading.Event()

        def prepare(s: Settings) -> None:
            if not reachable.is_set():
                raise psycopg.OperationalError("connection refused (the database is not reachable yet)")
            prepare_database(s)
            with psycopg.connect(url) as conn:
                register_devices(conn, [d.record for d in fleet])

        keeper = SchemaKeeper(settings, prepare=prepare, first_delay_s=0.2, retry_max_s=0.5)
        assert not keeper.apply_now()
        gateway = Gateway(settings, schema=keeper)
        gateway.start()
        host, port = settings.mqtt_host_port
        pub = MqttPublisher(host, port, prefix=settings.mqtt_topic_prefix, client_id=f"pub-{uuid.uuid4().hex[:6]}",
                            **broker.tester_login)
        try:
            assert gateway.mqtt.wait_connected(15)
            for device_id, frame in sent:
                pub.publish(device_id, frame)
            assert pub.flush(30)
            deadline = time.monotonic() + 30
            while gateway.pipeline.counters["spooled"] < len(sent) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gateway.pipeline.counters["spooled"] == len(sent)        # acknowledged from the spool
            with psycopg.connect(url) as conn:
                assert conn.execute("SELECT to_regclass('water_readings')").fetchone()[0] is None
            reachable.set()                                                 # nothing else is done
            assert keeper.ready.wait(30)
            assert wait_for_count(url, "SELECT count(*) FROM water_readings", len(sent)) == len(sent)
            deadline = time.monotonic() + 30
            while not gateway.pipeline._spool.empty and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            pub.close()
            gateway.stop()
        with psycopg.connect(url) as conn:
            rows = Counter(conn.execute("SELECT device_id, meter_time, flow_m3 FROM water_readings").fetchall())
            raw = Counter(conn.execute("SELECT outcome FROM raw_uplinks").fetchall())
        assert rows == Counter((d, decode("cjt188", f)["meter_time"], decode("cjt188", f)["flow_m3"]) for d, f in sent)
        assert raw == Counter({("stored",): len(sent)})
        assert gateway.pipeline.counters["replayed"] == len(sent) and keeper.ready.is_set()
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
