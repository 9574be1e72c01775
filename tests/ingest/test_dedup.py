"""Dedup end to end: every uplink sent twice (or three times) over MQTT is stored once and counted as
a duplicate — copies in one batch, copies after the first was committed, and copies that a shared
subscription hands to two different gateways at the same moment.  The counts are checked against
plain SQL and against the Prometheus text the metrics render."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from ingest.gateway import Gateway
from ingest.metrics import render_prometheus
from simulators.publish import MqttPublisher
from simulators.water import make_meters
from tests.helpers import register_fleet, wait_for_count


def _uplinks(db_url: str, n: int, rounds: int, seed: int) -> list[tuple[str, bytes]]:
    meters = make_meters(register_fleet(db_url, n, seed=seed), seed=seed)
    t0 = datetime(2026, 11, 12, tzinfo=UTC)
    return [(m.device_id, m.frame(t0 + timedelta(minutes=15 * k))) for k in range(rounds) for m in meters]


def _publishers(settings, broker, count: int) -> list[MqttPublisher]:
    host, port = settings.mqtt_host_port
    return [MqttPublisher(host, port, prefix=settings.mqtt_topic_prefix, client_id=f"dup-{uuid.uuid4().hex[:6]}",
                          **broker.tester_login) for _ in range(count)]


def _send(publishers: list[MqttPublisher], uplinks: list[tuple[str, bytes]]) -> None:
    for device_id, payload in uplinks:
        for pub in publishers:                   # each publisher sends its own copy
            pub.publish(device_id, payload)
    for pub in publishers:
        assert pub.flush(60)


def _outcomes(db_url: str) -> tuple[Counter, Counter]:
    """(device, payload) stored, and raw-log rows by outcome, read with plain SQL."""
    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT device_id, payload FROM raw_uplinks WHERE outcome = 'stored'").fetchall()
        by_outcome = conn.execute("SELECT outcome, count(*) FROM raw_uplinks GROUP BY outcome").fetchall()
    return Counter((d, bytes(p)) for d, p in stored), Counter(dict(by_outcome))


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(1))))
            out[labels] = float(m.group(2))
    return out


def test_every_uplink_sent_twice_is_stored_once(settings, broker, no_thread_leaks):
    uplinks = _uplinks(settings.database_url, 40, 25, seed=31)          # 1,000 distinct uplinks
    gateway = Gateway(settings)
    gateway.start()
    pubs = []
    try:
        assert gateway.mqtt.wait_connected(10)
        pubs = _publishers(settings, broker, 2)
        _send(pubs, uplinks)                                             # copies close together
        assert wait_for_count(settings.database_url, "SELECT count(*) FROM raw_uplinks", 2 * len(uplinks)) \
            == 2 * len(uplinks)
        _send(pubs[:1], uplinks)                                         # a third copy, long after the first
        assert wait_for_count(settings.database_url, "SELECT count(*) FROM raw_uplinks", 3 * len(uplinks)) \
            == 3 * len(uplinks)
        time.sleep(0.3)
        snapshot = gateway.pipeline.metrics_snapshot()
    finally:
        for pub in pubs:
            pub.close()
        gateway.stop()
    stored, by_outcome = _outcomes(settings.database_url)
    assert stored == Counter(uplinks)
    assert by_outcome == {"stored": len(uplinks), "duplicate": 2 * len(uplinks)}
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM water_readings").fetchone()[0] == len(uplinks)
        assert conn.execute("SELECT sum(uplinks) FROM device_state").fetchone()[0] == len(uplinks)
    # The metrics agree with the database, in the dict and in the Prometheus text.
    assert snapshot["received"] == {"mqtt": 3 * len(uplinks)}
    assert snapshot["stored"] == {"mqtt": {"cjt188": len(uplinks)}}
    assert snapshot["duplicate"] == {"mqtt": {"cjt188": 2 * len(uplinks)}}
    text = render_prometheus({"gw": snapshot})
    key = (("codec", "cjt188"), ("gateway", "gw"), ("transport", "mqtt"))
    assert _samples(text, "iotjx_ingest_duplicate_total") == {key: 2 * len(uplinks)}
    assert _samples(text, "iotjx_ingest_stored_total") == {key: len(uplinks)}
    buckets = _samples(text, "iotjx_ingest_batch_seconds_bucket")
    assert buckets[(("gateway", "gw"), ("le", "+Inf"))] == snapshot["batch_seconds"]["count"] > 0
    assert "# TYPE iotjx_ingest_queue_depth gauge" in text


def test_copies_given_to_two_gateways_by_a_shared_subscription_are_stored_once(settings, broker, no_thread_leaks):
    if not broker.shared_subscriptions:
        pytest.skip("the embedded amqtt broker has no shared subscriptions")
    uplinks = _uplinks(settings.database_url, 40, 25, seed=32)
    group = f"g{uuid.uuid4().hex[:6]}"
    gateways = [Gateway(settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-{k}",
                                                    "mqtt_shared_group": group})) for k in range(2)]
    pubs = []
    for gateway in gateways:
        gateway.start()
    try:
        assert all(g.mqtt.wait_connected(10) for g in gateways)
        pubs = _publishers(settings, broker, 2)
        _send(pubs, uplinks)          # the broker deals the copies round robin: twins land on both gateways
        assert wait_for_count(settings.database_url, "SELECT count(*) FROM raw_uplinks", 2 * len(uplinks)) \
            == 2 * len(uplinks)
        time.sleep(0.3)
        snapshots = [g.pipeline.metrics_snapshot() for g in gateways]
    finally:
        for pub in pubs:
            pub.close()
        for gateway in gateways:
            gateway.stop()
    stored, by_outcome = _outcomes(settings.database_url)
    assert stored == Counter(uplinks)
    assert by_outcome == {"stored": len(uplinks), "duplicate": len(uplinks)}
    assert all(s["received"].get("mqtt", 0) > 0 for s in snapshots)     # both gateways had a share
    assert sum(s["duplicate"].get("mqtt", {}).get("cjt188", 0) for s in snapshots) == len(uplinks)
    assert all(g.pipeline.counters["db_retries"] == 0 for g in gateways)  # no deadlock between the replicas


def test_two_database_writers_store_copies_in_neighbouring_batches_once(db_url, no_thread_leaks):
    """With two writer connections, batch n and batch n+1 commit side by side; a copy in each is
    claimed by whichever commits first and is a duplicate for the other — never stored twice, no
    deadlock, every uplink acknowledged once."""
    import threading

    from iotjx.db import connect
    from iotjx.model import Uplink
    from ingest.pipeline import Pipeline
    from ingest.registry import DeviceRegistry
    from ingest.writer import Writer

    distinct = _uplinks(db_url, 50, 20, seed=37)                        # 1,000 distinct uplinks
    acked: Counter = Counter()
    lock = threading.Lock()

    def ack(outcome) -> None:
        with lock:
            acked[outcome.status] += 1

    writers = [Writer(lambda: connect(db_url)) for _ in range(2)]
    registry = DeviceRegistry(lambda: connect(db_url))
    pipeline = Pipeline(registry, writers[0], more_writers=writers[1:], batch_size=25, batch_age_s=0.05)
    pipeline.start()
    try:
        now = time.time()
        for k in range(0, len(distinct), 25):                          # each block of 25, then its copies:
            block = distinct[k:k + 25]                                  # the copies land in the next batch
            for device_id, payload in block + block[::-1]:
                pipeline.submit(Uplink(device_id=device_id, payload=payload, transport="mqtt",
                                       received_at=now, ack=ack))
        deadline = time.monotonic() + 60
        while sum(acked.values()) < 2 * len(distinct) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pipeline.stop()
        for w in writers:
            w.close()
        registry.close()
    assert acked == {"stored": len(distinct), "duplicate": len(distinct)}
    stored, by_outcome = _outcomes(db_url)
    assert stored == Counter(distinct)
    assert by_outcome == {"stored": len(distinct), "duplicate": len(distinct)}
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM water_readings").fetchone()[0] == len(distinct)
        assert conn.execute("SELECT sum(uplinks) FROM device_state").fetchone()[0] == len(distinct)


def test_copies_in_one_batch_are_judged_by_their_times_and_a_replays_keys_outlive_the_purge(db_url):
    """One batch holding a key three times (t, t + 10 s, t + 15 min; window 20 s) stores the first
    and the last, whatever their order in the batch.  Keys with old times claimed just now (a replay)
    survive the purge; keys old by both times go."""
    from iotjx.db import connect
    from ingest.writer import Writer

    writer = Writer(lambda: connect(db_url))
    t = time.time() - 3 * 86400
    try:
        keys = [("d1", b"k"), ("d1", b"k"), ("d1", b"k"), ("d2", b"k")]
        with writer.transaction() as tx:
            new = tx.claim(keys, [t + 900, t + 10, t, t + 5], 20.0)
        assert new == [True, False, True, True]
        with writer.transaction() as tx:       # the next batch: a copy 10 s after the last stored one
            assert tx.claim([("d1", b"k")], [t + 910], 20.0) == [False]
        assert writer.purge_dedup(86400) == 0                      # claimed just now: kept
        with psycopg.connect(db_url) as conn:
            conn.execute("UPDATE uplink_dedup SET claimed_at = now() - interval '2 days' WHERE device_id = 'd2'")
        assert writer.purge_dedup(86400) == 1
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT device_id, extract(epoch FROM received_at)::float8 FROM uplink_dedup"
                                ).fetchall() == [("d1", pytest.approx(t + 900, abs=1e-5))]
    finally:
        writer.close()
