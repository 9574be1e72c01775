"""Load and the bare ceilings of the ingest benchmark, each meant to run in a process of its own
(multiprocessing, spawn): MQTT publishers, a bare paho subscriber and the naive pipeline.

Publishers come in two kinds.  `wire` writes MQTT 3.1.1 PUBLISH packets (QoS 1) straight to a socket
and counts the broker's PUBACKs: the packets are what any client sends, but at ~2 µs a message
instead of paho's ~30 µs, so on a 2-core machine the load generator does not eat the core the
gateway needs (the role a C publisher plays in ../shared/CEILINGS.md).  `paho` is the real client
devices and our simulators use, for a run where the publisher's cost is part of the picture."""

from __future__ import annotations

import os
import resource
import select
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from _frames import RoundMaker

PIDS = [i.to_bytes(2, "big") for i in range(65536)]


@dataclass(frozen=True, slots=True)
class PublishJob:
    """One publisher process's share: its devices (rows of `tmpl`), rounds or a duration, a rate."""

    host: str
    port: int
    prefix: str
    client_id: str
    device_ids: tuple[str, ...]
    tmpl: np.ndarray
    base: datetime
    rounds: int
    kind: str = "wire"                # wire | paho
    rate: float = 0.0                 # messages/s of this process; 0: as fast as the broker takes them
    duration_s: float = 0.0           # > 0: repeat rounds until this long (times are then not kept)
    times_path: str = ""              # where to save each message's publish time (epoch s), round-major


def _login() -> tuple[str, str]:
    """The broker account the load logs in with (a tester account: it may publish and read every
    uplink), from IOTJX_BENCH_MQTT_USERNAME / _PASSWORD, which ingest_e2e.py sets for the broker it
    starts; empty for an anonymous broker."""
    return os.environ.get("IOTJX_BENCH_MQTT_USERNAME", ""), os.environ.get("IOTJX_BENCH_MQTT_PASSWORD", "")


def _paho_login(client) -> None:
    username, password = _login()
    if username:
        client.username_pw_set(username, password)


def own_usage() -> dict:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "max_rss_mb": ru.ru_maxrss / 1024}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


class _Pacer:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t0 = time.time()

    def wait(self, sent: int) -> None:
        if self.rate > 0:
            ahead = self.t0 + sent / self.rate - time.time()
            if ahead > 0.0005:
                time.sleep(ahead)


def _rounds(job: PublishJob):
    """(round, frames matrix) for the job's rounds, or until its duration has passed."""
    maker = RoundMaker(job.tmpl, job.base)
    started = time.time()
    r = 0
    while (r < job.rounds) if job.duration_s <= 0 else (time.time() - started < job.duration_s):
        yield r, maker.frames(r)
        r += 1


class _WirePublisher:
    """MQTT 3.1.1 over a plain socket: CONNECT, PUBLISH QoS 1 in chunks, count PUBACKs."""

    WINDOW = 20_000          # unacknowledged PUBLISHes at most (packet ids are 16 bits)

    def __init__(self, job: PublishJob) -> None:
        self.sock = socket.create_connection((job.host, job.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        username, password = _login()
        flags = 0x02 | (0xC0 if username else 0)      # clean session, user name and password (§3.1.2.3)
        body = _utf8("MQTT") + bytes([4, flags]) + (0).to_bytes(2, "big") + _utf8(job.client_id)
        if username:
            body += _utf8(username) + _utf8(password)
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = self._read_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"broker refused the publisher: {connack.hex()}")
        self.sent = 0
        self.acked = 0
        self._buf = b""
        self._pid = 0

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            data += chunk
        return data

    def read_acks(self, block: bool) -> None:
        if block:
            select.select([self.sock], [], [], 5.0)
        try:
            data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionError("the broker closed the connection")
        data = self._buf + data
        whole = len(data) // 4 * 4
        if whole == 0:
            self._buf = data
            return
        if data[0] != 0x40 or data[whole - 4:whole][:2] != b"\x40\x02":
            raise ConnectionError(f"expected PUBACKs, got {data[:8].hex()}")
        self.acked += whole // 4
        self._buf = data[whole:]

    def publish_chunk(self, headers: list[bytes], frames: list[bytes]) -> None:
        while self.sent - self.acked > self.WINDOW - len(frames):
            self.read_acks(block=True)
        parts = []
        pid = self._pid
        for header, frame in zip(headers, frames):
            pid = pid % 65535 + 1
            parts += (header, PIDS[pid], frame)
        self._pid = pid
        self.sock.sendall(b"".join(parts))
        self.sent += len(frames)
        self.read_acks(block=False)

    def flush(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while self.acked < self.sent and time.time() < deadline:
            self.read_acks(block=True)
        return self.acked == self.sent

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
        finally:
            self.sock.close()


def _publish_wire(job: PublishJob, start, times: np.ndarray | None) -> dict:
    pub = _WirePublisher(job)
    headers = []
    for device_id in job.device_ids:
        topic = _utf8(f"{job.prefix}/up/{device_id}")
        headers.append(b"\x32" + _varint(len(topic) + 2 + job.tmpl.shape[1]) + topic)
    n = len(job.device_ids)
    chunk = 200 if job.rate <= 0 else max(1, min(200, int(job.rate / 2000)))
    start()
    pacer = _Pacer(job.rate)
    t_first = time.time()
    for r, frames in _rounds(job):
        rows = [bytes(row) for row in frames]
        for start in range(0, n, chunk):
            pacer.wait(pub.sent)
            stop = min(start + chunk, n)
            if times is not None:
                times[r * n + start:r * n + stop] = time.time()
            pub.publish_chunk(headers[start:stop], rows[start:stop])
    t_last = time.time()
    ok = pub.flush(120)
    t_acked = time.time()
    pub.close()
    return {"sent": pub.sent, "acked": pub.acked, "ok": ok, "t_first": t_first, "t_last": t_last,
            "t_acked": t_acked}


def _publish_paho(job: PublishJob, start, times: np.ndarray | None) -> dict:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    state = {"acked": 0}
    cond = threading.Condition()

    def on_publish(client, userdata, mid, reason_code, properties):
        with cond:
            state["acked"] += 1
            cond.notify_all()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=job.client_id, protocol=mqtt.MQTTv311)
    _paho_login(client)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.connect(job.host, job.port, keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        raise ConnectionError("paho publisher: no CONNACK")
    topics = [f"{job.prefix}/up/{d}" for d in job.device_ids]
    n = len(topics)
    sent = 0
    start()
    pacer = _Pacer(job.rate)
    t_first = time.time()
    for r, frames in _rounds(job):
        for j, row in enumerate(frames):
            if sent - state["acked"] > 10_000:          # bound paho's own queue
                with cond:
                    cond.wait_for(lambda: sent - state["acked"] <= 5_000, timeout=5)
            pacer.wait(sent)
            if times is not None:
                times[r * n + j] = time.time()
            client.publish(topics[j], bytes(row), qos=1)
            sent += 1
    t_last = time.time()
    with cond:
        ok = cond.wait_for(lambda: state["acked"] >= sent, timeout=120)
    t_acked = time.time()
    client.disconnect()
    client.loop_stop()
    return {"sent": sent, "acked": state["acked"], "ok": ok, "t_first": t_first, "t_last": t_last,
            "t_acked": t_acked}


def publish_worker(job: PublishJob, ready, go, results) -> None:
    """Process entry: connect, say ready, wait for `go`, publish, report (and save publish times)."""
    try:
        times = None
        if job.times_path and job.duration_s <= 0:
            times = np.zeros(len(job.device_ids) * job.rounds, dtype=np.float64)

        def start() -> None:             # connected: say so, then wait for the common start
            ready.release()
            go.wait()

        run = _publish_wire if job.kind == "wire" else _publish_paho
        out = run(job, start, times)
        if times is not None:
            np.save(job.times_path, times)
        results.put({"role": "publisher", "client_id": job.client_id, **out, **own_usage()})
    except BaseException as exc:  # the parent waits on this queue: always answer
        ready.release()
        results.put({"role": "publisher", "client_id": job.client_id, "error": repr(exc)})


# --------------------------------------------------------------------------- bare subscriber

SHARED_IDLE_S = 2.0


def bare_subscriber(host: str, port: int, topic_filter: str, client_id: str, expected: int | None, ready,
                    results, protocol: str = "5") -> None:
    """The broker's ceiling for one paho client: QoS 1, the gateway's protocol, auto-ack, count only.
    `expected` None (one of several on a shared subscription, share unknown): done once no message
    came for `SHARED_IDLE_S`; the time of the last one is kept (one `time.time()` a message)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    state = {"n": 0, "t_first": 0.0, "t_last": 0.0}
    done = threading.Event()

    def on_message(client, userdata, msg):
        state["n"] += 1
        if state["n"] == 1:
            state["t_first"] = time.time()
        if state["n"] == expected:
            state["t_last"] = time.time()
            done.set()

    def on_shared_message(client, userdata, msg):
        state["n"] += 1
        state["t_last"] = time.time()
        if state["n"] == 1:
            state["t_first"] = state["t_last"]

    def idle_watch() -> None:
        while not (state["n"] and time.time() - state["t_last"] > SHARED_IDLE_S):
            time.sleep(0.1)
        done.set()

    v5 = protocol == "5"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    _paho_login(client)
    client.on_message = on_message if expected is not None else on_shared_message
    client.on_subscribe = lambda *a: ready.release()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic_filter, qos=1)
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = 65535                 # as the gateway asks (ingest/mqtt.py)
        client.connect(host, port, keepalive=30, clean_start=True, properties=props)
    else:
        client.connect(host, port, keepalive=30)
    client.loop_start()
    if expected is None:
        threading.Thread(target=idle_watch, daemon=True).start()
    finished = done.wait(600)
    client.disconnect()
    client.loop_stop()
    results.put({"role": "subscriber", "received": state["n"], "ok": finished, "t_first": state["t_first"],
                 "t_last": state["t_last"], **own_usage()})


# --------------------------------------------------------------------------- the naive pipeline

NAIVE_INSERT = """INSERT INTO naive_water_readings (time, device_id, transport, meter_address, meter_type,
    flow_m3, settlement_flow_m3, meter_time, status, valve, battery_low)
    VALUES (%s, %s, 'mqtt', %s, %s, %s, %s, %s, %s, %s, %s)"""


def naive_pipeline(host: str, port: int, topic_filter: str, client_id: str, db_url: str, settings: dict,
                   expected: int, ready, results) -> None:
    """What a user writes first: a paho callback that decodes and INSERTs each message (autocommit).
    paho acknowledges on receipt, before the INSERT: this pipeline can lose data, ours cannot."""
    from datetime import UTC

    import paho.mqtt.client as mqtt
    import psycopg
    from paho.mqtt.enums import CallbackAPIVersion

    import decoders

    conn = psycopg.connect(db_url, autocommit=True)
    prefix_len = len(topic_filter) - 1               # "<prefix>/up/+" -> strip "<prefix>/up/"
    state = {"n": 0, "errors": 0, "t_first": 0.0, "t_last": 0.0}
    done = threading.Event()

    def on_message(client, userdata, msg):
        try:
            r = decoders.decode("cjt188", msg.payload, settings)
            conn.execute(NAIVE_INSERT, (datetime.now(UTC), msg.topic[prefix_len:], r["meter_address"],
                                        r["meter_type"], r["flow_m3"], r["settlement_flow_m3"], r["meter_time"],
                                        r["status"], r["valve"], r["battery_low"]))
        except Exception:
            state["errors"] += 1
        state["n"] += 1
        if state["n"] == 1:
            state["t_first"] = time.time()
        if state["n"] == expected:
            state["t_last"] = time.time()
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    _paho_login(client)
    client.on_message = on_message if expected is not None else on_shared_message
    client.on_subscribe = lambda *a: ready.release()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic_filter, qos=1)
    client.connect(host, port, keepalive=60)
    client.loop_start()
    finished = done.wait(900)
    client.disconnect()
    client.loop_stop()
    conn.close()
    results.put({"role": "naive", "received": state["n"], "errors": state["errors"], "ok": finished,
                 "t_first": state["t_first"], "t_last": state["t_last"], "pid": os.getpid(), **own_usage()})
