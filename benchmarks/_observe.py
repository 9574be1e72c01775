"""What the ingest benchmark watches: its own database, commits as they happen, gateway processes,
and the CPU and memory of every process taking part."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg

ROOT = Path(__file__).resolve().parents[1]
CHANNEL = "iotjx_bench_commit"

# Told at commit, not before: a NOTIFY is delivered only when its transaction commits.  One per
# COPY into water_readings (a statement trigger; the gateway's batch is one COPY and one
# transaction), carrying the transaction id that the rows' xmin names.
_COMMIT_TRIGGER = f"""
CREATE OR REPLACE FUNCTION bench_commit_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('{CHANNEL}', txid_current()::text); RETURN NULL; END $$;
DROP TRIGGER IF EXISTS bench_commit_notify ON water_readings;
CREATE TRIGGER bench_commit_notify AFTER INSERT ON water_readings
    FOR EACH STATEMENT EXECUTE FUNCTION bench_commit_notify();
CREATE TABLE IF NOT EXISTS naive_water_readings (LIKE water_readings INCLUDING DEFAULTS INCLUDING INDEXES);
CREATE TABLE IF NOT EXISTS copy_water_readings (LIKE water_readings INCLUDING DEFAULTS INCLUDING INDEXES);
"""
RESET_TABLES = ("water_readings", "raw_uplinks", "uplink_dedup", "device_state", "rejected_uplinks",
                "naive_water_readings", "copy_water_readings", "gateway_status")


def with_db(url: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)


class BenchDatabase:
    """A fresh database on the server at `admin_url`, migrated as the gateway expects; dropped at close."""

    def __init__(self, admin_url: str, keep: bool = False) -> None:
        from iotjx.runtime import prepare_database
        from iotjx.settings import Settings

        self.admin_url = admin_url
        self.name = f"iotjx_bench_{uuid.uuid4().hex[:8]}"
        self.keep = keep
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = with_db(admin_url, self.name)
        prepare_database(Settings(database_url=self.url))
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(_COMMIT_TRIGGER)

    def register(self, records) -> dict:
        from iotjx.devices import register_devices
        with psycopg.connect(self.url) as conn:
            return register_devices(conn, records)

    def register_bulk(self, device_ids: list[str], model: str) -> float:
        """COPY devices straight into the registry (register_devices does one INSERT each); seconds."""
        t0 = time.perf_counter()
        with psycopg.connect(self.url) as conn:
            site_id, pilot = conn.execute("""SELECT (SELECT min(site_id) FROM sites),
                                                    (SELECT pilot FROM device_models WHERE model = %s)""",
                                          (model,)).fetchone()
            with conn.cursor() as cur, cur.copy("COPY devices (device_id, model, pilot, network, site_id) "
                                                "FROM STDIN") as copy:
                tail = f"\t{model}\t{pilot}\tnbiot\t{site_id}\n"
                for start in range(0, len(device_ids), 50_000):
                    copy.write("".join(d + tail for d in device_ids[start:start + 50_000]))
            conn.commit()
            conn.execute("ANALYZE devices")
        return time.perf_counter() - t0

    def reset(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {', '.join(RESET_TABLES)}")

    def scalar(self, sql: str, params=()) -> object:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql, params).fetchone()[0]

    def close(self) -> None:
        if self.keep:
            return
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class CommitListener:
    """Collects (transaction id, arrival time) of every committed COPY into water_readings."""

    def __init__(self, db_url: str) -> None:
        self._conn = psycopg.connect(db_url, autocommit=True)
        self._conn.execute(f"LISTEN {CHANNEL}")
        self.commits: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for note in self._conn.notifies(timeout=0.2):
                self.commits.append((int(note.payload), time.time()))

    def clear(self) -> None:
        self.commits = []

    @property
    def last(self) -> float:
        return max((t for _, t in self.commits), default=0.0)

    def by_xid32(self) -> dict[int, float]:
        """xmin is the low 32 bits of txid_current()."""
        return {xid & 0xFFFFFFFF: t for xid, t in self.commits}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()


# --------------------------------------------------------------------------- CPU and memory

def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


@dataclass
class _Tracked:
    proc: psutil.Process
    cpu0: float
    cpu1: float
    rss_max: int = 0


@dataclass
class Usage:
    """CPU seconds and peak RSS of a group of processes over a measured window."""

    cpu_s: float = 0.0
    rss_max_mb: float = 0.0        # sampled every `interval` (sum over the group's processes)
    hwm_mb: float = 0.0            # the kernel's VmHWM (exact peak), largest process of the group
    processes: int = 0


@dataclass
class Sampler:
    """Samples named process groups every `interval` s; PostgreSQL backends of `db_name` are found
    as they come (pg_stat_activity).  `window()` is the busy cores per group and the machine's."""

    groups: dict[str, list[int]]
    db_url: str | None = None
    db_name: str | None = None
    interval: float = 0.5
    _tracked: dict[str, dict[int, _Tracked]] = field(default_factory=dict)
    _rss_sum_max: dict[str, int] = field(default_factory=dict)
    series: dict[str, list[tuple[float, int]]] = field(default_factory=dict)   # (t, summed RSS) per group

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t0 = time.time()
        self._sys0 = psutil.cpu_times()
        self._conn = psycopg.connect(self.db_url, autocommit=True) if self.db_url else None
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def _pg_pids(self) -> list[int]:
        if self._conn is None:
            return []
        rows = self._conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                                  (self.db_name,)).fetchall()
        return [r[0] for r in rows]

    def _sample(self, first: bool = False) -> None:
        groups = dict(self.groups)
        if self.db_name:
            groups["postgres"] = self._pg_pids()
        with self._lock:
            for name, pids in groups.items():
                tracked = self._tracked.setdefault(name, {})
                total_rss = 0
                for pid in pids:
                    try:
                        t = tracked.get(pid)
                        if t is None:
                            proc = psutil.Process(pid)
                            born_inside = proc.create_time() > self._t0 and not first
                            c = _cpu(proc)
                            t = tracked[pid] = _Tracked(proc, 0.0 if born_inside else c, c)
                        t.cpu1 = _cpu(t.proc)
                        rss = t.proc.memory_info().rss
                        t.rss_max = max(t.rss_max, rss)
                        total_rss += rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                self._rss_sum_max[name] = max(self._rss_sum_max.get(name, 0), total_rss)
                self.series.setdefault(name, []).append((time.time() - self._t0, total_rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def add(self, name: str, pid: int) -> None:
        self.groups.setdefault(name, []).append(pid)

    def stop(self) -> tuple[float, dict[str, Usage], float]:
        """(wall seconds, usage per group, busy cores of the whole machine)."""
        self._sample()
        self._stop.set()
        self._thread.join(5)
        wall = time.time() - self._t0
        sys1 = psutil.cpu_times()
        busy = lambda t: t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)  # noqa: E731
        machine = (busy(sys1) - busy(self._sys0)) / wall if wall > 0 else 0.0
        out = {}
        for name, tracked in self._tracked.items():
            hwm = max((_hwm(pid) for pid in tracked), default=0.0)
            out[name] = Usage(cpu_s=sum(t.cpu1 - t.cpu0 for t in tracked.values()),
                              rss_max_mb=self._rss_sum_max.get(name, 0) / 2**20, hwm_mb=hwm,
                              processes=len(tracked))
        if self._conn is not None:
            self._conn.close()
        return wall, out, machine


def _hwm(pid: int) -> float:
    """VmHWM of a live process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# --------------------------------------------------------------------------- gateway processes

@dataclass
class GatewayGroup:
    """`n` gateway processes (`python -m iotjx.cli gateway`) configured by IOTJX_* variables."""

    db_url: str
    env: dict[str, str]
    client_ids: list[str]
    workdir: Path
    profile_dir: Path | None = None
    cmd: tuple[str, ...] = ()              # default: python -m iotjx.cli gateway
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> None:
        for cid in self.client_ids:
            env = {**os.environ, **self.env, "IOTJX_MQTT_CLIENT_ID": cid}
            cmd = list(self.cmd) or [sys.executable, "-m", "iotjx.cli", "gateway"]
            if self.profile_dir is not None:
                cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw", "--rate", "100",
                       "--nonblocking", "--threads", "--gil", "-o", str(self.profile_dir / f"{cid}.txt"), "--"] + cmd
            log = open(self.workdir / f"{cid}.log", "wb")
            self.procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = time.time() + timeout
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while time.time() < deadline:
                n = conn.execute("SELECT count(*) FROM gateway_status WHERE broker_connected AND gateway_id = ANY(%s)",
                                 (self.client_ids,)).fetchone()[0]
                if n == len(self.client_ids):
                    return
                if any(p.poll() is not None for p in self.procs):
                    break
                time.sleep(0.2)
        self.stop()
        logs = "\n".join((self.workdir / f"{cid}.log").read_text()[-2000:] for cid in self.client_ids)
        raise RuntimeError(f"gateways did not connect within {timeout:.0f} s:\n{logs}")

    @property
    def pids(self) -> list[int]:
        """The gateway processes themselves (under py-spy: its child)."""
        out = []
        for p in self.procs:
            try:
                kids = psutil.Process(p.pid).children() if self.profile_dir is not None else []
            except psutil.NoSuchProcess:
                kids = []
            out.append(kids[0].pid if kids else p.pid)
        return out

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to each gateway (it drains, acks and exits; py-spy then writes its profile);
        SIGKILL after `timeout`, so that no gateway outlives the benchmark's database."""
        gateways = self.pids
        for pid in gateways:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        for p, pid in zip(self.procs, gateways):
            try:
                p.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                print(f"gateway {pid} did not stop within {timeout:.0f} s of SIGTERM: killed", file=sys.stderr)
                for victim in {pid, p.pid}:
                    try:
                        os.kill(victim, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait()
        self.procs = []
