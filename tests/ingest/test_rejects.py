"""Junk cannot take the gateway's memory or the database: too-large uplinks are kept as `too_large`
rejects without their bytes (cut before they are queued when over IOTJX_UPLINK_MAX_BYTES), rejects
past a per-source rate are counted in reject_tally instead of written, and old rejects are purged in
chunks by one gateway at a time.  Real PostgreSQL (and, for MQTT, the real broker and paho); the
expected figures are computed here from what was sent."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import threading
import time
import tomllib
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from iotjx.broker import PROJECT_CONF, MosquittoProcess
from iotjx.db import connect
from iotjx.model import Uplink
from ingest.gateway import Gateway
from ingest.metrics import render_prometheus
from ingest.pipeline import Pipeline
from ingest.registry import DeviceRegistry
from ingest.rejects import KEPT_BYTES, PURGE_LOCK, RejectRetention, purge_rejects
from ingest.writer import WriteSet, Writer
from simulators.publish import MqttPublisher
from simulators.water import make_meters
from tests.helpers import register_fleet, wait_for_count

T0 = datetime(2026, 11, 10, 8, 0, tzinfo=UTC).timestamp()       # on a minute boundary


class Acks:
    """Each uplink's outcome as its transport is told (exactly once each, or the test fails)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: dict[int, object] = {}
        self.twice = 0

    def __call__(self, key: int):
        def ack(outcome) -> None:
            with self.lock:
                self.twice += key in self.outcomes
                self.outcomes[key] = outcome
        return ack

    def wait(self, n: int, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.outcomes) >= n:
                    return True
            time.sleep(0.05)
        return False


def _pipeline(db_url: str, writers: int = 1, **kwargs) -> Pipeline:
    registry = DeviceRegistry(lambda: connect(db_url, application_name="test-registry"))
    made = [Writer(lambda: connect(db_url, application_name="test-writer")) for _ in range(writers)]
    return Pipeline(registry, made[0], more_writers=made[1:], batch_age_s=0.05, **kwargs)


def _stop(pipeline: Pipeline) -> None:
    pipeline.stop()
    for writer in pipeline._writers:
        writer.close()
    pipeline._builder._registry.close()


def _blake2b(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


# ------------------------------------------------------------------------------------ too large
def test_too_large_uplinks_are_rejected_without_their_bytes_and_never_queued_whole(db_url, no_thread_leaks):
    meter = make_meters(register_fleet(db_url, 1, seed=41), seed=41)[0]       # cjt188-nb-water-std: 512 bytes
    good = meter.frame(datetime(2026, 11, 10, 8, tzinfo=UTC))
    huge = bytes(range(256)) * 40_000                                         # 10,240,000 bytes
    huge_other = huge[:KEPT_BYTES] + b"\x01" + huge[KEPT_BYTES + 1:]          # same first KiB, other bytes
    over_model = b"\x68" + bytes(4999)                                        # 5,000: over 512, under 64 KiB
    at_model = b"\x68" + bytes(511)                                           # 512: the model's limit, decoded
    sent = [(meter.device_id, good), (meter.device_id, huge), ("869000000000001", huge),
            (meter.device_id, over_model), (meter.device_id, at_model), (meter.device_id, huge),
            (meter.device_id, huge_other)]
    acks = Acks()
    pipeline = _pipeline(db_url, uplink_max_bytes=65536, queue_max_bytes=1 << 20)
    uplinks = [Uplink(d, p, "mqtt", T0 + i, ack=acks(i)) for i, (d, p) in enumerate(sent)]
    pipeline.submit_many(uplinks[:3], "mqtt")          # before the writer runs: what the queue holds
    assert pipeline.queue_depth == 3
    assert pipeline.queue_bytes == len(good) + 2 * KEPT_BYTES                 # never 10 MB
    pipeline.start()
    try:
        for u in uplinks[3:]:
            pipeline.submit(u)
        assert acks.wait(len(sent)) and acks.twice == 0
    finally:
        _stop(pipeline)
    out = [acks.outcomes[i] for i in range(len(sent))]
    assert [(o.status, o.reason) for o in out] == [
        ("stored", None), ("rejected", "too_large"), ("rejected", "too_large"), ("rejected", "too_large"),
        ("rejected", "length"), ("duplicate", None), ("rejected", "too_large")]
    assert f"{len(huge):,} bytes" in out[1].detail and _blake2b(huge) in out[1].detail
    assert "IOTJX_UPLINK_MAX_BYTES" in out[1].detail
    assert f"{len(over_model):,} bytes" in out[3].detail and "512" in out[3].detail
    assert _blake2b(over_model) in out[3].detail and _blake2b(huge_other) in out[6].detail
    with psycopg.connect(db_url) as conn:
        rejects = conn.execute("SELECT device_id, codec, reason, payload, detail FROM rejected_uplinks "
                               "WHERE reason = 'too_large' ORDER BY received_at").fetchall()
        raw = conn.execute("SELECT outcome, length(payload) FROM raw_uplinks ORDER BY received_at").fetchall()
    assert [(d, c, bytes(p)) for d, c, _, p, _ in rejects] == [
        (meter.device_id, None, huge[:KEPT_BYTES]), ("869000000000001", None, huge[:KEPT_BYTES]),
        (meter.device_id, "cjt188", over_model[:KEPT_BYTES]), (meter.device_id, None, huge_other[:KEPT_BYTES])]
    assert raw == [("stored", len(good)), ("rejected:too_large", KEPT_BYTES), ("rejected:too_large", KEPT_BYTES),
                   ("rejected:too_large", KEPT_BYTES), ("rejected:length", 512), ("duplicate", KEPT_BYTES),
                   ("rejected:too_large", KEPT_BYTES)]
    assert pipeline.counters["too_large.mqtt"] == 4


def test_a_model_without_a_limit_of_its_own_has_the_catalogue_default(db_url):
    """What `sync_models` put in device_models, against the TOML read here (16,384 where a model
    does not say)."""
    expected = {}
    for path in sorted((Path(__file__).resolve().parents[2] / "decoders" / "models").glob("*.toml")):
        for name, table in tomllib.loads(path.read_text()).get("models", {}).items():
            expected[name] = table.get("max_payload_bytes", 16384)
    with psycopg.connect(db_url) as conn:
        got = dict(conn.execute("SELECT model, max_payload_bytes FROM device_models").fetchall())
    assert got == expected
    assert got["cjt188-nb-water-std"] == 512 and got["cat1-json-traffic-counter"] == 16384


@pytest.fixture
def unbounded_broker(tmp_path):
    """The shipped broker configuration without its message size limits: the gateway's own ceiling is
    what stands between an oversize uplink and its memory (a broker configured otherwise, EMQX's
    default 1 MB, a bridge)."""
    if not shutil.which("mosquitto") and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed")
    base = tmp_path / "unbounded.conf"
    base.write_text("".join(line for line in PROJECT_CONF.read_text().splitlines(keepends=True)
                            if not line.startswith(("message_size_limit", "max_packet_size"))))
    workdir = Path(tempfile.mkdtemp(prefix="iotjx-unbounded-"))
    own = MosquittoProcess(workdir, base=base).start()
    yield own
    own.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
def test_mqtt_megabyte_uplinks_are_kept_as_too_large_rejects_of_a_kibibyte(settings, unbounded_broker,
                                                                           no_thread_leaks):
    """The attack of issue 11 at a twentieth of its size, past a broker that lets it through: 20 MQTT
    uplinks of 1 MB through the real broker and the gateway: acknowledged as rejects, and neither
    table holds their bytes."""
    meter = make_meters(register_fleet(settings.database_url, 1, seed=42), seed=42)[0]
    big = [bytes([k]) * 1_000_000 for k in range(20)]
    gateway = Gateway(settings.model_copy(update={"uplink_max_bytes": 65536, "mqtt_protocol": "3.1.1",
                                                  **unbounded_broker.gateway_settings()}))
    gateway.start()
    try:
        assert gateway.mqtt.wait_connected(10)
        pub = MqttPublisher("127.0.0.1", unbounded_broker.port, prefix=settings.mqtt_topic_prefix,
                            client_id="test-big", **unbounded_broker.tester_login)
        for k, payload in enumerate(big):
            pub.publish(meter.device_id if k % 2 else f"86900000000{k:04d}", payload)
        assert pub.flush(60)
        pub.close()
        assert wait_for_count(settings.database_url, "SELECT count(*) FROM rejected_uplinks", 20) == 20
        with psycopg.connect(settings.database_url) as conn:
            rows = conn.execute("SELECT reason, length(payload), detail FROM rejected_uplinks").fetchall()
            raw = conn.execute("SELECT max(length(payload)), count(*) FROM raw_uplinks").fetchone()
        assert {(r, n) for r, n, _ in rows} == {("too_large", KEPT_BYTES)}
        assert sorted(re.search(r"BLAKE2b-128 of all of it ([0-9a-f]{32})", d).group(1) for _, _, d in rows) == \
            sorted(_blake2b(p) for p in big)
        assert raw == (KEPT_BYTES, 20)
        assert gateway.pipeline.metrics.snapshot()["rejected_by_reason"] == {"too_large": 20}
    finally:
        gateway.stop()


# ------------------------------------------------------------------------------------ counted, not written
def _source(meta: dict, transport: str) -> str:
    """Who sent it, as the brief defines it (computed here, not by the code under test)."""
    if meta.get("username"):
        return meta["username"]
    if meta.get("peer"):
        return meta["peer"].split(":")[0]
    return transport


def test_rejects_past_the_rate_are_counted_per_source_and_minute_across_writers_and_gateways(
        db_url, caplog, no_thread_leaks):
    meter = make_meters(register_fleet(db_url, 1, seed=43), seed=43)[0]
    good = meter.frame(datetime(2026, 11, 10, 8, tzinfo=UTC))
    senders = [("coap", {"peer": "10.0.0.1:5683"}), ("coap", {"peer": "10.0.0.1:41000"}),   # one source
               ("coap", {"peer": "10.0.0.2:5683"}), ("mqtt", {"username": "tester-a"}), ("mqtt", {}),
               ("http", {"peer": "192.0.2.7", "envelope": None})]
    rate = 5
    sent, expected = [], Counter()
    for k in range(260):
        transport, meta = senders[k % len(senders)]
        unknown = k % 3 != 0
        device = f"8690000{k:08d}" if unknown else meter.device_id
        at = T0 + (k % 2) * 60 + k / 1000                                 # two minutes, interleaved
        bad = good[:-2] + bytes([good[-2] ^ (1 + k // 3), 0x16])     # a checksum error, its own bytes each
        sent.append(Uplink(device, good + bytes([k % 256, k // 256]) if unknown else bad, transport, at, dict(meta)))
        expected[(int(at // 60 * 60), transport, _source(meta, transport),
                  "unknown_device" if unknown else "checksum")] += 1
    acks = Acks()
    uplinks = [Uplink(u.device_id, u.payload, u.transport, u.received_at, u.meta, acks(i)) for i, u in enumerate(sent)]
    gateways = [_pipeline(db_url, writers=2, batch_size=7, reject_rows_per_min=rate) for _ in range(2)]
    caplog.set_level(logging.WARNING, logger="ingest.rejects")
    for p in gateways:
        p.start()
    try:
        for i in range(0, len(uplinks), 5):
            gateways[(i // 5) % 2].submit_many(uplinks[i:i + 5], "mixed")
        assert acks.wait(len(uplinks)) and acks.twice == 0
    finally:
        for p in gateways:
            _stop(p)
    assert all(o.status == "rejected" for o in acks.outcomes.values())
    with psycopg.connect(db_url) as conn:
        rows = Counter()
        for at, transport, meta, reason in conn.execute(
                "SELECT received_at, transport, meta, reason FROM rejected_uplinks").fetchall():
            rows[(int(at.timestamp() // 60 * 60), transport, _source(meta or {}, transport), reason)] += 1
        tally = {(int(m.timestamp()), t, s, r): (n, sup) for m, t, s, r, n, sup in conn.execute(
            "SELECT minute, transport, source, reason, rejects, suppressed FROM reject_tally").fetchall()}
        raw = conn.execute("SELECT count(*) FROM raw_uplinks WHERE outcome LIKE 'rejected:%'").fetchone()[0]
    assert rows == Counter({k: min(n, rate) for k, n in expected.items()})
    assert tally == {k: (n, max(0, n - rate)) for k, n in expected.items()}
    assert raw == sum(rows.values())
    suppressed = sum(max(0, n - rate) for n in expected.values())
    assert sum(p.counters["rejects_suppressed"] for p in gateways) == suppressed
    text = "".join(render_prometheus({f"gw{k}": p.metrics_snapshot()}) for k, p in enumerate(gateways))
    metric = re.findall(r'iotjx_ingest_rejects_suppressed_total\{gateway="gw\d",transport="(\w+)",reason="(\w+)"\} (\d+)',
                        text)
    by_reason = Counter()
    for transport, reason, n in metric:
        by_reason[(transport, reason)] += int(n)
    want = Counter()
    for (_, transport, _, reason), n in expected.items():
        want[(transport, reason)] += max(0, n - rate)
    assert by_reason == +want
    # Logged once per source (and per gateway), not once per reject.
    said = Counter(re.match(r"rejects from (\w+) (\S+) past", r.getMessage()).groups() for r in caplog.records
                   if r.getMessage().startswith("rejects from"))
    assert set(said) == {(t, s) for (_, t, s, _), n in expected.items() if n > rate}
    assert max(said.values()) <= len(gateways)


@hsettings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_first_rows_of_each_key_are_kept_whatever_the_batches(db_url, data):
    """Against a plain fold over the rejects in order: batches of any size, committed one after
    another, keep exactly the first `rate` of each (minute, source, reason) as rows."""
    run = f"h{time.monotonic_ns()}"                       # this example's transport: its own keys
    rate = data.draw(st.integers(0, 4))
    keys = data.draw(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["a", "b"]), st.sampled_from(["x", "y"])),
                              min_size=1, max_size=40))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(keys)), max_size=6))) | {len(keys)})
    fold, seen = [], Counter()
    for key in keys:
        seen[key] += 1
        fold.append(seen[key] <= rate)
    writer = Writer(lambda: connect(db_url))
    try:
        start = 0
        for end in cuts:
            ws = WriteSet()
            for i in range(start, end):
                minute, peer, reason = keys[i]
                ws.add_reject(Uplink(f"{run}-{i}", b"\x00", run, T0 + 60 * minute + 1, {"peer": f"{peer}:1"}),
                              None, reason, "")
            with writer.transaction() as tx:
                tx.tally_rejects(ws, rate)
                tx.write(ws)
            start = end
    finally:
        writer.close()
    with psycopg.connect(db_url) as conn:
        kept = {int(d.rsplit("-", 1)[1]) for (d,) in conn.execute(
            "SELECT device_id FROM rejected_uplinks WHERE transport = %s", (run,)).fetchall()}
    assert kept == {i for i, keep in enumerate(fold) if keep}


# ------------------------------------------------------------------------------------ retention
def _old_and_new_rejects(db_url: str, old: int, new: int) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(db_url) as conn:
        conn.execute("""
            INSERT INTO rejected_uplinks (received_at, device_id, transport, payload, reason)
            SELECT %s - k * interval '1 minute', 'old-' || k, 'mqtt', '\\x00'::bytea, 'checksum' FROM generate_series(1, %s) k
            UNION ALL
            SELECT %s - k * interval '1 minute', 'new-' || k, 'mqtt', '\\x00', 'checksum' FROM generate_series(1, %s) k""",
                     (now - timedelta(days=31), old, now - timedelta(days=29), new))
        conn.execute("""
            INSERT INTO reject_tally (minute, transport, source, reason, rejects)
            SELECT date_trunc('minute', %s - k * interval '1 minute'), 'mqtt', 's', 'checksum', 1
            FROM generate_series(1, %s) k""", (now - timedelta(days=31), old))


def _left(db_url: str) -> tuple[int, int, int]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("""SELECT (SELECT count(*) FROM rejected_uplinks WHERE device_id LIKE 'old-%%'),
                                      (SELECT count(*) FROM rejected_uplinks WHERE device_id LIKE 'new-%%'),
                                      (SELECT count(*) FROM reject_tally)""").fetchone()


def test_purge_deletes_past_the_window_in_chunks_and_one_gateway_at_a_time(db_url):
    _old_and_new_rejects(db_url, old=23, new=11)
    with psycopg.connect(db_url, autocommit=True) as conn, psycopg.connect(db_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (PURGE_LOCK,))          # another gateway is purging
        assert purge_rejects(conn, 30, chunk=5) is None
        assert _left(db_url) == (23, 11, 23)
        other.execute("SELECT pg_advisory_unlock(%s)", (PURGE_LOCK,))
        first = purge_rejects(conn, 30, chunk=5, budget_s=0)                  # one chunk, then the budget is out
        assert (first.rows, first.done) == ({"rejected_uplinks": 5, "reject_tally": 0}, False)
        assert _left(db_url) == (18, 11, 23)
        rest = purge_rejects(conn, 30, chunk=5)
        assert (rest.rows, rest.done) == ({"rejected_uplinks": 18, "reject_tally": 23}, True)
        assert _left(db_url) == (0, 11, 0)
        assert purge_rejects(conn, 30, chunk=5).rows == {"rejected_uplinks": 0, "reject_tally": 0}
        # The lock is released after each run: the other session can take it now.
        assert other.execute("SELECT pg_try_advisory_lock(%s)", (PURGE_LOCK,)).fetchone()[0]


def test_two_gateways_purging_at_once_delete_each_row_once(db_url):
    _old_and_new_rejects(db_url, old=400, new=3)
    results, barrier = [], threading.Barrier(2)

    def purge() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            barrier.wait()
            results.append(purge_rejects(conn, 30, chunk=10))

    threads = [threading.Thread(target=purge) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done = [r for r in results if r is not None]
    assert sum(r.rows["rejected_uplinks"] for r in done) == 400 and all(r.done for r in done)
    assert _left(db_url) == (0, 3, 0)


def test_the_gateway_purges_on_its_schedule_and_stops_cleanly(db_url, no_thread_leaks):
    _old_and_new_rejects(db_url, old=12, new=2)
    retention = RejectRetention(lambda: connect(db_url), 30, interval_s=3600, first_after_s=0.05, chunk=5)
    retention.start()
    try:
        deadline = time.monotonic() + 30
        while retention.deleted < 24 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        retention.stop()
    assert retention.deleted == 24 and _left(db_url) == (0, 2, 0)


def test_an_unreachable_database_postpones_the_purge(caplog, no_thread_leaks):
    def refuse():
        raise psycopg.OperationalError("connection refused")

    retention = RejectRetention(refuse, 30, interval_s=0.02, first_after_s=0.0)
    with caplog.at_level(logging.WARNING, logger="ingest.rejects"):
        retention.start()
        time.sleep(0.3)
        retention.stop()
    said = [r for r in caplog.records if "reject retention postponed" in r.getMessage()]
    assert len(said) == 1 and retention.runs == 0
