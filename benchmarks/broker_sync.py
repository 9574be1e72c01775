"""`iotjx broker sync` at fleet scale: the time and memory to write Mosquitto's files for N device
accounts, and what the broker then takes to load them (start) and to reload them (SIGHUP).

    python benchmarks/broker_sync.py --accounts 100000 1000000 [--pg-admin-url URL]

Each size gets a database of its own (dropped afterwards) with N registered devices and N device
accounts (salts and hashes made by PostgreSQL: their content does not matter to the sync).  The sync
runs in a child process so that its peak RSS is its own."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "cjt188-nb-water-std"


def _fill(url: str, n: int) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO devices (device_id, model, pilot, network)
                        SELECT (860000000000000 + g)::text, %s, 'water', 'nbiot' FROM generate_series(1, %s) g""",
                     (MODEL, n))
        conn.execute("""INSERT INTO mqtt_accounts (username, role, device_id, iterations, salt, password_hash)
                        SELECT d, 'device', d, 101, substring(decode(md5(d), 'hex') from 1 for 12),
                               sha512(convert_to(d, 'UTF8'))
                        FROM (SELECT (860000000000000 + g)::text AS d FROM generate_series(1, %s) g) s""", (n,))
        conn.execute("UPDATE devices SET status = 'retired' WHERE device_id::bigint % 100 = 0")  # 1 % left out
        conn.execute("VACUUM ANALYZE devices")
        conn.execute("VACUUM ANALYZE mqtt_accounts")
    return time.perf_counter() - started


def child(url: str, conf_dir: str) -> None:
    """In its own process: one sync; prints its figures as JSON."""
    from iotjx import broker_sync
    with psycopg.connect(url, autocommit=True) as conn:
        result = broker_sync.sync(conn, Path(conf_dir), "iotjx")
    print(json.dumps({"devices": result.devices, "seconds": result.seconds, "bytes": result.device_bytes,
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _connect(port: int, username: str, password: str) -> socket.socket:
    """A device's MQTT 3.1.1 CONNECT (clean session, user name and password), answered."""
    def utf8(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(2, "big") + raw
    body = utf8("MQTT") + bytes([4, 0xC2]) + (600).to_bytes(2, "big") + utf8("") + utf8(username) + utf8(password)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(bytes([0x10, len(body)]) + body)
    connack = sock.recv(4)
    if connack[:2] != b"\x20\x02" or connack[3] != 0:
        raise ConnectionError(f"refused: {connack.hex()}")
    return sock


def _broker_figures(conf_dir: Path, device_id: str, password: str, connected: dict[str, str]) -> dict:
    """Start Mosquitto with the files; time its start, then one SIGHUP reload with `connected` devices
    connected (until another device's CONNECT is answered: the broker's one thread reloads first)."""
    from iotjx.broker import MosquittoProcess
    workdir = Path(tempfile.mkdtemp(prefix="iotjx-bsync-"))
    workdir.chmod(0o755)
    own = MosquittoProcess(workdir, topic_prefix="iotjx")
    # The generated device file, beside the broker's own service accounts.
    (own.conf_dir / "devices.passwd").write_bytes((conf_dir / "devices.passwd").read_bytes())
    started = time.perf_counter()
    own.start()
    start_s = time.perf_counter() - started
    rss = _rss_mb(own.proc.pid)
    socks = [_connect(own.device_port, d, pw) for d, pw in connected.items()]
    started = time.perf_counter()
    os.kill(own.proc.pid, 1)
    time.sleep(0.01)
    ok = subprocess.run(["mosquitto_pub", "-p", str(own.device_port), "-u", device_id, "-P", password,
                         "-t", f"iotjx/up/{device_id}", "-m", "x", "-q", "1"], capture_output=True).returncode == 0
    reload_s = time.perf_counter() - started
    for sock in socks:
        sock.close()
    own.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    return {"broker_start_s": start_s, "connected": len(socks), "broker_reload_s": reload_s, "broker_rss_mb": rss,
            "device_login_ok": ok}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--connected", type=int, default=0, help="devices connected during the reload")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from iotjx.db.migrations import upgrade
    from iotjx.devices import sync_models
    from iotjx.mqtt_accounts import set_device_password
    for n in args.accounts:
        name = f"iotjx_bsync_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        info = psycopg.conninfo.conninfo_to_dict(args.pg_admin_url)
        info["dbname"] = name
        url = psycopg.conninfo.make_conninfo(**info)
        try:
            upgrade(url)
            with psycopg.connect(url) as conn:
                sync_models(conn)
                conn.commit()
            fill_s = _fill(url, n)
            with psycopg.connect(url) as conn:            # accounts with known passwords, to log in
                known = "860000000000001"
                password = set_device_password(conn, known)
                connected = {str(860000000000001 + k): set_device_password(conn, str(860000000000001 + k))
                             for k in range(1, args.connected + 1) if (860000000000001 + k) % 100}
                conn.commit()
            conf_dir = Path(tempfile.mkdtemp(prefix="iotjx-bsync-files-"))
            out = subprocess.run([sys.executable, __file__, "--child", url, str(conf_dir)], capture_output=True,
                                 text=True, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            figures.update(_broker_figures(conf_dir, known, password, connected))
            shutil.rmtree(conf_dir, ignore_errors=True)
            print(json.dumps({"accounts": n, "fill_s": round(fill_s, 1),
                              **{k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}}),
                  flush=True)
        finally:
            with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
