"""The measurements of the ingest benchmark, one function each; `Bench` holds what they share
(broker, database, fleet, commit listener).  ingest_e2e.py runs them and prints the figures."""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg

from _frames import MODEL, RoundMaker, check_round, model_settings, templates
from _load import PublishJob, bare_subscriber, naive_pipeline, publish_worker
from _observe import BenchDatabase, CommitListener, GatewayGroup, Sampler

SPAWN = mp.get_context("spawn")


@dataclass
class Bench:
    """Shared state of one benchmark invocation."""

    broker: object                       # iotjx.broker.MosquittoProcess
    db: BenchDatabase
    device_ids: list[str]
    tmpl: np.ndarray                     # one frame per device (row i for device i)
    publishers: int
    publisher_kind: str
    batch_size: int
    workdir: Path
    listener: CommitListener | None = None
    profile_dir: Path | None = None
    runs: int = 0
    gateway_env: dict[str, str] = field(default_factory=dict)
    mqtt_protocol: str = "3.1.1"
    gateway_cmd: tuple[str, ...] = ()    # what runs as a gateway; () = python -m iotjx.cli gateway

    def next_run(self) -> tuple[str, datetime]:
        """A fresh topic prefix (no old persistent session matches it) and a fresh meter-time base."""
        self.runs += 1
        return f"bench{os.getpid()}r{self.runs}", datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=10 * self.runs)

    @property
    def host_port(self) -> tuple[str, int]:
        return "127.0.0.1", self.broker.port


def make_bench(broker, db: BenchDatabase, devices: int, publishers: int, publisher_kind: str, batch_size: int,
               workdir: Path) -> Bench:
    """Register `devices` water meters (iotjx.devices.register_devices) and build their frames."""
    from simulators.fleet import plan_water_fleet

    fleet = plan_water_fleet(devices, seed=11, model=MODEL)
    db.register([d.record for d in fleet])
    tmpl = templates([d.meter_address for d in fleet], seed=11)
    check_round(RoundMaker(tmpl, datetime(2026, 1, 1, tzinfo=UTC)), 3)
    return Bench(broker=broker, db=db, device_ids=[d.record.device_id for d in fleet], tmpl=tmpl,
                 publishers=publishers, publisher_kind=publisher_kind, batch_size=batch_size, workdir=workdir)


# --------------------------------------------------------------------------- publishing

@dataclass
class Publishing:
    """Publisher processes started and connected; `go()` starts them all at once, `wait()` reports."""

    procs: list
    jobs: list[PublishJob]
    results: object
    go_event: object
    t_go: float = 0.0

    def go(self) -> None:
        self.t_go = time.time()
        self.go_event.set()

    def wait(self, timeout: float = 900) -> list[dict]:
        out = [self.results.get(timeout=timeout) for _ in self.procs]
        for p in self.procs:
            p.join(30)
        errors = [r["error"] for r in out if "error" in r]
        if errors:
            raise RuntimeError(f"publisher failed: {errors[0]}")
        return out

    def times(self) -> list[np.ndarray]:
        return [np.load(j.times_path) for j in self.jobs]


def start_publishers(bench: Bench, prefix: str, base: datetime, rounds: int = 1, *, device_ids=None, tmpl=None,
                     rate: float = 0.0, duration_s: float = 0.0, keep_times: bool = True) -> Publishing:
    device_ids = bench.device_ids if device_ids is None else device_ids
    tmpl = bench.tmpl if tmpl is None else tmpl
    host, port = bench.host_port
    ready, go, results = SPAWN.Semaphore(0), SPAWN.Event(), SPAWN.Queue()
    bounds = np.linspace(0, len(device_ids), bench.publishers + 1).astype(int)
    jobs, procs = [], []
    for k in range(bench.publishers):
        lo, hi = bounds[k], bounds[k + 1]
        times_path = str(bench.workdir / f"{prefix}-pub{k}.npy") if keep_times else ""
        job = PublishJob(host=host, port=port, prefix=prefix, client_id=f"{prefix}-pub{k}",
                         device_ids=tuple(device_ids[lo:hi]), tmpl=tmpl[lo:hi] if len(tmpl) == len(device_ids)
                         else tmpl[np.arange(lo, hi) % len(tmpl)], base=base, rounds=rounds,
                         kind=bench.publisher_kind, rate=rate / bench.publishers, duration_s=duration_s,
                         times_path=times_path)
        jobs.append(job)
        procs.append(SPAWN.Process(target=publish_worker, args=(job, ready, go, results), daemon=True))
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=120):
            raise RuntimeError("a publisher did not connect")
    return Publishing(procs, jobs, results, go)


def _rate(n: int, t0: float, t1: float) -> float:
    return n / (t1 - t0) if t1 > t0 else 0.0


def _usage_dict(wall: float, usage: dict, machine: float) -> dict:
    return {"wall_s": wall, "machine_cores": machine,
            "cores": {k: u.cpu_s / wall for k, u in usage.items()},
            "rss_mb": {k: u.rss_max_mb for k, u in usage.items()},
            "hwm_mb": {k: u.hwm_mb for k, u in usage.items()}}


# --------------------------------------------------------------------------- ceiling 1: the broker alone

def run_bare_subscriber(bench: Bench, rounds: int, processes: int = 1) -> dict:
    """Same publishers, same frames, into paho subscribers that only count: one, or `processes` on
    one shared subscription (the machine's ceiling for as many gateways)."""
    prefix, base = bench.next_run()
    n = len(bench.device_ids) * rounds
    host, port = bench.host_port
    ready, results = SPAWN.Semaphore(0), SPAWN.Queue()
    topic_filter = f"{prefix}/up/+" if processes == 1 else f"$share/{prefix}b/{prefix}/up/+"
    subs = [SPAWN.Process(target=bare_subscriber, args=(host, port, topic_filter, f"{prefix}-bare{k}",
                                                        n if processes == 1 else None, ready, results,
                                                        bench.mqtt_protocol), daemon=True)
            for k in range(processes)]
    for sub in subs:
        sub.start()
    for _ in subs:
        if not ready.acquire(timeout=60):
            raise RuntimeError("a bare subscriber did not subscribe")
    pub = start_publishers(bench, prefix, base, rounds, keep_times=False)
    sampler = Sampler({"subscriber": [sub.pid for sub in subs], "broker": [bench.broker.proc.pid],
                       "publishers": [p.pid for p in pub.procs]})
    pub.go()
    pubs = pub.wait()
    got = [results.get(timeout=900) for _ in subs]
    wall, usage, machine = sampler.stop()
    for sub in subs:
        sub.join(30)
    t0 = min(r["t_first"] for r in pubs)
    return {"messages": n, "received": sum(g["received"] for g in got),
            "rate": _rate(n, t0, max(g["t_last"] for g in got)),
            "publish_rate": _rate(n, t0, max(r["t_acked"] for r in pubs)), **_usage_dict(wall, usage, machine)}


# --------------------------------------------------------------------------- the gateway end to end

def _wait_stored(bench: Bench, n: int, stall_s: float = 90.0, poll_s: float = 0.25) -> int:
    """Poll the stored count (device_state, written in each batch's transaction) until it reaches `n`."""
    last, last_change = -1, time.time()
    with psycopg.connect(bench.db.url, autocommit=True) as conn:
        while True:
            stored = int(conn.execute("SELECT coalesce(sum(uplinks), 0) FROM device_state").fetchone()[0])
            if stored >= n:
                return stored
            if stored != last:
                last, last_change = stored, time.time()
            elif time.time() - last_change > stall_s:
                rejects = conn.execute("SELECT reason, count(*) FROM rejected_uplinks GROUP BY 1").fetchall()
                raise RuntimeError(f"stalled at {stored} of {n} stored; rejects: {rejects}")
            time.sleep(poll_s)


def gateway_env(bench: Bench, prefix: str, shared: bool, extra: dict | None = None) -> dict[str, str]:
    host, port = bench.host_port
    env = {"IOTJX_DATABASE_URL": bench.db.url, "IOTJX_MQTT_URL": f"mqtt://{host}:{port}",
           "IOTJX_MQTT_PROTOCOL": bench.mqtt_protocol, "IOTJX_MQTT_TOPIC_PREFIX": prefix, "IOTJX_LOG_LEVEL": "WARNING",
           "IOTJX_BATCH_SIZE": str(bench.batch_size), "IOTJX_DATA_DIR": str(bench.workdir / prefix),
           **bench.gateway_env, **(extra or {})}
    if shared:
        env["IOTJX_MQTT_SHARED_GROUP"] = f"{prefix}g"
    return env


def latency(bench: Bench, pub: Publishing, base: datetime) -> dict:
    """publish → commit for every stored row: the row's (device, meter time) names its message and
    so its publish time; its xmin names its transaction, whose NOTIFY arrival is the commit time."""
    commit_at = bench.listener.by_xid32()
    owner: dict[str, tuple[int, int, int]] = {}
    for w, job in enumerate(pub.jobs):
        for j, device_id in enumerate(job.device_ids):
            owner[device_id] = (w, j, len(job.device_ids))
    times = pub.times()
    base_s = base.timestamp()
    with psycopg.connect(bench.db.url, autocommit=True) as conn:
        rows = conn.execute("""SELECT device_id, extract(epoch FROM meter_time)::float8,
                                      extract(epoch FROM time)::float8, xmin::text::bigint
                               FROM water_readings""").fetchall()
    published, received, committed = [], [], []
    missing = 0
    for device_id, meter_s, recv_s, xmin in rows:
        commit = commit_at.get(xmin)
        if commit is None:
            missing += 1
            continue
        w, j, n = owner[device_id]
        published.append(times[w][int(round(meter_s - base_s)) * n + j])
        received.append(recv_s)
        committed.append(commit)
    p, r, c = np.array(published), np.array(received), np.array(committed)
    q = [50, 95, 99]
    if not len(p):
        return {"rows": len(rows), "missing_commit": missing}
    return {"rows": len(rows), "missing_commit": missing,
            "publish_to_commit_ms": (np.percentile(c - p, q) * 1000).tolist(),
            "publish_to_gateway_ms": (np.percentile(r - p, q) * 1000).tolist(),
            "gateway_to_commit_ms": (np.percentile(c - r, q) * 1000).tolist(),
            "max_ms": float((c - p).max() * 1000)}


def run_gateway(bench: Bench, rounds: int = 1, processes: int = 1, *, device_ids=None, tmpl=None,
                rate: float = 0.0, duration_s: float = 0.0, keep_times: bool = True,
                extra_env: dict | None = None, during=None, keep_series: bool = False) -> dict:
    """Publishers → broker → `processes` gateways (`python -m iotjx.cli gateway`) → PostgreSQL.
    The rate runs from the first publish to the commit of the last row; `during(result)` runs while
    the publishers publish (the outage phase stops the database there)."""
    device_ids = bench.device_ids if device_ids is None else device_ids
    prefix, base = bench.next_run()
    bench.db.reset()
    bench.listener.clear()
    gw = GatewayGroup(bench.db.url, gateway_env(bench, prefix, shared=processes > 1, extra=extra_env),
                      [f"{prefix}-gw{k}" for k in range(processes)], bench.workdir,
                      profile_dir=bench.profile_dir if processes == 1 else None, cmd=bench.gateway_cmd)
    gw.start()
    try:
        pub = start_publishers(bench, prefix, base, rounds, device_ids=device_ids, tmpl=tmpl, rate=rate,
                               duration_s=duration_s, keep_times=keep_times and duration_s <= 0)
        sampler = Sampler({"gateway": gw.pids, "broker": [bench.broker.proc.pid],
                           "publishers": [p.pid for p in pub.procs], "harness": [os.getpid()]},
                          db_url=bench.db.url, db_name=bench.db.name,
                          interval=1.0 if len(device_ids) > 100_000 else 0.5)
        pub.go()
        extra = during(sampler) if during is not None else {}
        pubs = pub.wait(timeout=duration_s + 900)
        n = sum(r["sent"] for r in pubs)
        stored = _wait_stored(bench, n, poll_s=1.0 if len(device_ids) > 100_000 else 0.25)
        t_end = bench.listener.last
        wall, usage, machine = sampler.stop()
    finally:
        gw.stop()
    t0 = min(r["t_first"] for r in pubs)
    out = {"messages": n, "stored": stored, "rate": _rate(n, t0, t_end),
           "publish_rate": _rate(n, t0, max(r["t_acked"] for r in pubs)), **extra,
           **_usage_dict(wall, usage, machine)}
    if keep_series:
        out["series"] = sampler.series
    with psycopg.connect(bench.db.url, autocommit=True) as conn:
        out["rows"] = conn.execute("SELECT count(*) FROM water_readings").fetchone()[0]
        out["rejected"] = conn.execute("SELECT count(*) FROM rejected_uplinks").fetchone()[0]
        out["duplicates"] = conn.execute("SELECT count(*) FROM raw_uplinks WHERE outcome = 'duplicate'").fetchone()[0]
    if keep_times and duration_s <= 0:
        out["latency"] = latency(bench, pub, base)
    return out


# --------------------------------------------------------------------------- ceiling 2: PostgreSQL alone

def run_copy(bench: Bench) -> dict:
    """COPY the rows the last gateway run stored into copy_water_readings (same columns and index),
    `batch_size` rows per COPY and per transaction as the gateway does; only the COPYs are timed."""
    with psycopg.connect(bench.db.url) as conn:
        buf = bytearray()
        with conn.cursor().copy("COPY (SELECT * FROM water_readings) TO STDOUT") as copy:
            for chunk in copy:
                buf += chunk
        lines = bytes(buf).splitlines(keepends=True)
        conn.execute("TRUNCATE copy_water_readings")
        conn.commit()
        chunks = [b"".join(lines[i:i + bench.batch_size]) for i in range(0, len(lines), bench.batch_size)]
        t0 = time.perf_counter()
        for chunk in chunks:
            with conn.cursor().copy("COPY copy_water_readings FROM STDIN") as copy:
                copy.write(chunk)
            conn.commit()
        elapsed = time.perf_counter() - t0
    return {"rows": len(lines), "rate": len(lines) / elapsed if elapsed else 0.0, "batch": bench.batch_size}


def run_pipeline_alone(bench: Bench, rounds: int) -> dict:
    """The gateway's writer without a transport: `Pipeline.process` on batches of uplinks built in
    memory (dedup, decode, COPY, commit) — where the pipeline would be without MQTT in front."""
    from decoders.warmup import warm_up
    from iotjx.db import connect
    from iotjx.model import Uplink
    from ingest.pipeline import Pipeline
    from ingest.registry import DeviceRegistry
    from ingest.writer import Writer

    _, base = bench.next_run()
    bench.db.reset()
    warm_up()
    maker = RoundMaker(bench.tmpl, base)
    now = time.time()
    uplinks = [Uplink(device_id=d, payload=bytes(row), transport="mqtt", received_at=now)   # as MqttIngest makes them
               for r in range(rounds) for d, row in zip(bench.device_ids, maker.frames(r))]
    url = bench.db.url
    registry = DeviceRegistry(lambda: connect(url, application_name="bench-registry"))
    writer = Writer(lambda: connect(url, application_name="bench-writer"))
    pipeline = Pipeline(registry, writer, batch_size=bench.batch_size)
    t0 = time.perf_counter()
    for i in range(0, len(uplinks), bench.batch_size):
        pipeline.process(uplinks[i:i + bench.batch_size])
    elapsed = time.perf_counter() - t0
    writer.close()
    registry.close()
    return {"messages": len(uplinks), "rate": len(uplinks) / elapsed, "stored": pipeline.counters["stored"]}


# --------------------------------------------------------------------------- ceiling 3: the naive pipeline

def run_naive(bench: Bench, messages: int) -> dict:
    prefix, base = bench.next_run()
    bench.db.reset()
    device_ids = bench.device_ids[:messages] if messages < len(bench.device_ids) else bench.device_ids
    rounds = max(1, messages // len(device_ids))
    n = len(device_ids) * rounds
    host, port = bench.host_port
    ready, results = SPAWN.Semaphore(0), SPAWN.Queue()
    proc = SPAWN.Process(target=naive_pipeline, args=(host, port, f"{prefix}/up/+", f"{prefix}-naive", bench.db.url,
                                                      model_settings(), n, ready, results), daemon=True)
    proc.start()
    if not ready.acquire(timeout=60):
        raise RuntimeError("the naive pipeline did not subscribe")
    pub = start_publishers(bench, prefix, base, rounds, device_ids=device_ids, tmpl=bench.tmpl[:len(device_ids)],
                           keep_times=False)
    sampler = Sampler({"naive": [proc.pid], "broker": [bench.broker.proc.pid],
                       "publishers": [p.pid for p in pub.procs]}, db_url=bench.db.url, db_name=bench.db.name)
    pub.go()
    pubs = pub.wait()
    got = results.get(timeout=1800)
    wall, usage, machine = sampler.stop()
    proc.join(30)
    t0 = min(r["t_first"] for r in pubs)
    rows = bench.db.scalar("SELECT count(*) FROM naive_water_readings")
    return {"messages": n, "rows": rows, "errors": got["errors"], "rate": _rate(n, t0, got["t_last"]),
            **_usage_dict(wall, usage, machine)}


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="iotjx-bench-"))
