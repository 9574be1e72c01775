"""What the broker's persistence settings cost, and what a broker crash loses with each.

    python benchmarks/broker_durability.py                   # every variant, 2 repeats
    python benchmarks/broker_durability.py --variants 5s,changes-10k --repeats 3

Mosquitto keeps its queues in memory and writes its whole state to `mosquitto.db` every
`autosave_interval` seconds (or, with `autosave_on_changes true`, after that many changes) and when
it stops.  A crash (SIGKILL, power) loses what was PUBACKed since the last save.  For each variant of
the shipped configuration (deploy/mosquitto/mosquitto.conf, autosave lines replaced) this measures,
with the gateway away (its persistent session holds the backlog — the case persistence is for):

* **backlog rate**: uplinks/s the broker acknowledges while `--backlog` of them pile up for the
  gateway's session (every save writes the whole backlog, so a save's cost grows with it);
* **crash loss**: a paced stream (`--rate` uplinks/s, unique payloads) for `--crash-s` seconds, the
  broker SIGKILLed at a random moment in the second half, restarted, and the gateway's session
  drained: how many PUBACKed uplinks did not come back, and that as seconds of the stream.

The throughput of the whole ingest path under each variant is `benchmarks/ingest_e2e.py
--broker-set autosave_interval=1 …` (the same knobs).  Results: benchmarks/README.md, "Broker
durability"."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from iotjx.broker import PROJECT_CONF, MosquittoProcess  # noqa: E402

VARIANTS = {   # name -> the autosave lines of the variant (persistence on in all but "off")
    "5s": {"autosave_interval": "5"},                                   # shipped
    "1s": {"autosave_interval": "1"},
    "30s": {"autosave_interval": "30"},
    "changes-1k": {"autosave_on_changes": "true", "autosave_interval": "1000"},
    "changes-10k": {"autosave_on_changes": "true", "autosave_interval": "10000"},
    "changes-100k": {"autosave_on_changes": "true", "autosave_interval": "100000"},
    "off": {"persistence": "false"},
}
PREFIX = "bench"
PAYLOAD = 40           # bytes: a CJ/T 188 reply is 40-60


def variant_conf(overrides: dict[str, str], path: Path, base: Path = PROJECT_CONF) -> Path:
    """`base` with each key of `overrides` set (its lines replaced, or appended)."""
    lines, done = [], set()
    for line in base.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in overrides:
            if key not in done:
                lines.append(f"{key} {overrides[key]}")
                done.add(key)
            continue
        lines.append(line)
    lines += [f"{k} {v}" for k, v in overrides.items() if k not in done]
    path.write_text("\n".join(lines) + "\n")
    return path


def _client(broker: MosquittoProcess, client_id: str, login: dict, clean: bool):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=clean)
    client.username_pw_set(login["username"], login["password"])
    return client


def _session(broker: MosquittoProcess, on_message=None, keep: bool = False):
    """The gateway's persistent session: subscribed to every uplink, QoS 1.  Without `keep` it only
    makes sure the session exists (then leaves, so that uplinks queue for it)."""
    client = _client(broker, "bench-gateway", broker.gateway_login, clean=False)
    subscribed = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/up/+", qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    if on_message is not None:
        client.on_message = on_message
    client.connect("127.0.0.1", broker.port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(15):
        raise RuntimeError("the gateway's session did not subscribe")
    if keep:
        return client
    client.disconnect()
    client.loop_stop()
    return None


def _publisher(port: int, login: dict, n: int, rate: float, acked, done, times) -> None:
    """Process entry: publish `n` unique uplinks (payload = sequence number) at `rate` (0: as fast as
    the broker acknowledges) over a plain MQTT 3.1.1 socket (`_load._WirePublisher`, ~2 µs a message:
    paho's ~250 µs here would be the ceiling instead of the broker); `acked.value` is how many were
    PUBACKed — the first ones, as a broker acknowledges QoS 1 in order (MQTT 3.1.1 §4.6) — and
    `times` the first publish's and the last PUBACK's time (monotonic)."""
    import os
    from types import SimpleNamespace

    sys.path.append(str(Path(__file__).resolve().parent))     # after the project: benchmarks/decoders.py
    from _load import _utf8, _varint, _WirePublisher

    os.environ.update(IOTJX_BENCH_MQTT_USERNAME=login["username"], IOTJX_BENCH_MQTT_PASSWORD=login["password"])
    pub = _WirePublisher(SimpleNamespace(host="127.0.0.1", port=port, client_id="bench-publisher"))
    pad = bytes(PAYLOAD - 8)
    headers = []
    for d in range(1000):
        topic = _utf8(f"{PREFIX}/up/d{d}")
        headers.append(b"\x32" + _varint(len(topic) + 2 + PAYLOAD) + topic)
    chunk = 100 if rate <= 0 else max(1, min(100, int(rate / 1000)))
    t0 = times[0] = time.monotonic()
    try:
        for first in range(0, n, chunk):
            if rate > 0:
                delay = t0 + first / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            seqs = range(first, min(first + chunk, n))
            pub.publish_chunk([headers[q % 1000] for q in seqs], [q.to_bytes(8, "big") + pad for q in seqs])
            if pub.acked > acked.value:
                acked.value, times[1] = pub.acked, time.monotonic()
        while pub.acked < pub.sent:
            pub.read_acks(block=True)
            acked.value, times[1] = pub.acked, time.monotonic()
        pub.close()
    except OSError:                                   # the broker is gone (ConnectionError included)
        pass
    acked.value = pub.acked
    done.set()


def _start_publisher(broker: MosquittoProcess, n: int, rate: float):
    ctx = mp.get_context("spawn")
    acked = ctx.Value("q", 0, lock=False)
    times = ctx.Array("d", 2, lock=False)
    done = ctx.Event()
    proc = ctx.Process(target=_publisher, args=(broker.port, broker.tester_login, n, rate, acked, done, times))
    proc.start()
    return proc, acked, done, times


def backlog_rate(broker: MosquittoProcess, n: int) -> dict:
    """Uplinks/s the broker acknowledges while `n` of them pile up for the absent gateway."""
    _session(broker)
    proc, acked, done, times = _start_publisher(broker, n, 0.0)
    done.wait(600)
    proc.join(30)
    count = acked.value
    elapsed = times[1] - times[0]
    return {"acked": count, "seconds": round(elapsed, 2), "rate": round(count / elapsed)}


def crash_loss(broker: MosquittoProcess, rate: float, seconds: float, rng: random.Random) -> dict:
    """PUBACKed uplinks a SIGKILL of the broker loses, the gateway away (its session holds them)."""
    _session(broker)
    n = int(rate * seconds)
    proc, acked, done, times = _start_publisher(broker, n, rate)
    while not times[0] and proc.is_alive():
        time.sleep(0.01)                             # connected and publishing
    kill_at = rng.uniform(seconds / 2, seconds)
    time.sleep(kill_at)
    broker.proc.kill()                               # SIGKILL: no save on the way out
    broker.proc.wait()
    proc.join(90)
    if proc.is_alive():
        proc.kill()
    sent_acked = set(range(acked.value))
    broker.start()
    got: set[int] = set()
    last = [time.monotonic()]

    def on_message(client, userdata, msg):
        got.add(int.from_bytes(msg.payload[:8], "big"))
        last[0] = time.monotonic()

    client = _session(broker, on_message, keep=True)
    while time.monotonic() - last[0] < 3.0:
        time.sleep(0.2)
    client.disconnect()
    client.loop_stop()
    lost = len(sent_acked - got)
    return {"killed_at_s": round(kill_at, 2), "acked": len(sent_acked), "recovered": len(sent_acked & got),
            "lost": lost, "lost_s": round(lost / rate, 2)}


def run_variant(name: str, args, rng: random.Random) -> dict:
    wd = Path(tempfile.mkdtemp(prefix=f"iotjx-durability-{name}-"))
    wd.chmod(0o755)
    try:
        conf = variant_conf(VARIANTS[name], wd / "base.conf")
        out: dict = {}
        broker = MosquittoProcess(wd / "b1", base=conf).start()
        try:
            out["backlog"] = backlog_rate(broker, args.backlog)
        finally:
            broker.stop()
        broker = MosquittoProcess(wd / "b2", base=conf).start()
        try:
            out["crash"] = crash_loss(broker, args.rate, args.crash_s, rng)
        finally:
            broker.stop()
        return out
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backlog", type=int, default=300_000, help="uplinks piled up in the backlog run")
    p.add_argument("--rate", type=float, default=5_000, help="uplinks/s of the crash run")
    p.add_argument("--crash-s", type=float, default=20.0, help="length of the crash run (killed in its second half)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - VARIANTS.keys()
    if unknown:
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
    rng = random.Random(args.seed)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(1, args.repeats + 1):
        for name in names:                            # interleaved: the machine's drift hits all alike
            result = run_variant(name, args, rng)
            runs[name].append(result)
            print(f"[{rep}] {name:13s} backlog {result['backlog']['rate']:>7,}/s   crash: "
                  f"{result['crash']['lost']:>6,} of {result['crash']['acked']:,} PUBACKed lost "
                  f"({result['crash']['lost_s']:.2f} s of stream, killed at {result['crash']['killed_at_s']} s)",
                  flush=True)
    print(f"\nsummary: {args.backlog:,}-uplink backlog; crash runs at {args.rate:,.0f}/s for {args.crash_s:.0f} s")
    print(f"{'variant':13s} {'backlog rate (median)':>22s} {'vs 5s':>7s} {'lost (max)':>11s} {'lost s (max)':>13s}")
    base = statistics.median(r["backlog"]["rate"] for r in runs.get("5s", [])) if "5s" in runs else None
    for name in names:
        rate = statistics.median(r["backlog"]["rate"] for r in runs[name])
        lost = max(r["crash"]["lost"] for r in runs[name])
        lost_s = max(r["crash"]["lost_s"] for r in runs[name])
        ratio = f"{rate / base:.2f}" if base else "-"
        print(f"{name:13s} {rate:>20,.0f}/s {ratio:>7s} {lost:>11,} {lost_s:>13.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
