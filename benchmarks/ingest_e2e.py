"""End-to-end ingest speed, measured against the machine's own ceilings in the same run.

    python benchmarks/ingest_e2e.py --quick             # a short run (~3 min)
    python benchmarks/ingest_e2e.py                     # the normal run (3 repeats)
    python benchmarks/ingest_e2e.py --long              # + the 10-minute memory run

Simulated water meters (real CJ/T 188 replies, benchmarks/_frames.py) publish over MQTT QoS 1 from
separate processes to a Mosquitto started with the project's configuration; the gateway
(`python -m iotjx.cli gateway`, dedup and decode on, PUBACK after commit) stores them in a fresh
database.  Figures, each repeated (`--repeats`, min / median / max):

* e2e: uplinks/s from the first publish to the commit of the last row, 1 gateway and 2 gateways
  on one shared subscription; latency publish → commit (p50/p95/p99) of every row;
* the broker alone: the same publishers into a bare paho subscriber that only counts;
* PostgreSQL alone: COPY of the same rows into a copy of water_readings;
* the gateway's writer alone (`Pipeline.process` without a transport);
* the naive pipeline: paho callback → one INSERT per message (autocommit);
* CoAP: the gateway's CoAP ingest vs a bare aiocoap server answering 2.04, from many endpoints;

then once: latency at a paced load, the gateway's RSS in a 1-minute (and `--long` 10-minute) run
at full rate, during a database outage (when the gateway has a spool), and with 1M registered
devices.  Targets (issue 6) are reported pass/fail, never asserted.  How commit times are observed:
benchmarks/README.md, "Ingest end to end"."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from _observe import BenchDatabase, CommitListener  # noqa: E402

TARGETS = (  # ratio name, numerator, denominator, at least (None: reported, no target)
    ("e2e / bare subscriber", "e2e_1", "bare", 0.85),
    ("e2e without rollups / bare subscriber", "e2e_plain", "bare", None),
    ("e2e with rollups / without", "e2e_1", "e2e_plain", None),
    ("2 gateways / 1", "e2e_2", "e2e_1", 1.15),
    ("2 bare subscribers / 1 (ceiling)", "bare_2", "bare", None),
    ("e2e / naive", "e2e_1", "naive", 20.0),
    ("CoAP gateway / bare aiocoap", "coap_gateway", "coap_bare", 0.70),
)
LABELS = {"bare": "bare paho subscriber (broker ceiling)", "bare_2": "2 bare subscribers (shared sub)",
          "e2e_1": "gateway e2e, 1 process",
          "e2e_plain": "gateway e2e, 1 process, IOTJX_ROLLUPS=false",
          "e2e_2": "gateway e2e, 2 processes (shared sub)", "naive": "naive pipeline (INSERT per message)",
          "copy": "PostgreSQL COPY alone (rows/s)", "pipeline": "gateway writer alone (no transport)",
          "coap_bare": "bare aiocoap server", "coap_gateway": "gateway CoAP ingest"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run: fewer messages, 2 repeats, short memory run")
    p.add_argument("--long", action="store_true", help="also the 10-minute memory run at full rate")
    p.add_argument("--long-s", type=float, default=600.0, help="duration of the --long memory run")
    p.add_argument("--repeats", type=int)
    p.add_argument("--messages", type=int, help="uplinks per MQTT run (rounded to whole rounds of the fleet)")
    p.add_argument("--devices", type=int, default=10_000, help="registered fleet publishing in the runs")
    p.add_argument("--publishers", type=int, default=2, help="publisher processes")
    p.add_argument("--publisher", choices=("wire", "paho"), default="wire")
    p.add_argument("--naive-messages", type=int)
    p.add_argument("--coap-requests", type=int)
    p.add_argument("--coap-clients", type=int, default=1, help="CoAP client processes")
    p.add_argument("--coap-endpoints", type=int, default=1000,
                   help="UDP endpoints (peers, one CON in flight each) per client process")
    p.add_argument("--batch-size", type=int, default=5000, help="IOTJX_BATCH_SIZE of the gateways")
    p.add_argument("--mqtt-protocol", choices=("5", "3.1.1"), default="3.1.1",
                   help="IOTJX_MQTT_PROTOCOL of the gateways, and the bare subscriber's protocol")
    p.add_argument("--gateway-cmd", default="",
                   help="command run as each gateway (A/B of a change); default: python -m iotjx.cli gateway")
    p.add_argument("--broker-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a line of the broker's configuration changed for this run, e.g. autosave_interval=1 "
                        "(repeatable; see broker_durability.py)")
    p.add_argument("--latency-load", type=float, default=0.5, help="paced latency run at this share of e2e rate")
    p.add_argument("--memory-s", type=float, help="duration of the short memory run (60 s; --quick 20 s)")
    p.add_argument("--memory-load", type=float, default=1.1,
                   help="memory runs publish at this multiple of the measured e2e rate (> 1: the gateway is saturated)")
    p.add_argument("--registry", type=int, default=1_000_000, help="registry size of the memory run; 0: skip")
    p.add_argument("--registry-touched", type=int, help="devices of that registry that send (300k; --quick 100k)")
    p.add_argument("--skip", default="", help="comma-separated: bare,plain,e2e_2,naive,copy,pipeline,coap,latency,"
                                               "memory,outage,registry")
    p.add_argument("--profile", type=Path, help="run the 1-process gateway under py-spy; raw profiles here")
    p.add_argument("--pg-admin-url", default=os.environ.get("IOTJX_BENCH_PG_URL",
                                                            "postgresql://postgres@127.0.0.1:5432/test"))
    p.add_argument("--keep-db", action="store_true", help="keep the database and the work directory (logs)")
    p.add_argument("--json", type=Path, help="write every figure here")
    a = p.parse_args(argv)
    q = a.quick
    a.repeats = a.repeats or (2 if q else 3)
    a.messages = a.messages or (50_000 if q else 200_000)
    a.naive_messages = a.naive_messages or (2_000 if q else 10_000)
    a.coap_requests = a.coap_requests or (5_000 if q else 20_000)
    a.memory_s = a.memory_s or (20.0 if q else 60.0)
    a.registry_touched = a.registry_touched or (100_000 if q else 300_000)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    return a


def machine() -> dict:
    import subprocess

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    import aiocoap
    import numba
    import paho.mqtt
    import psycopg
    return {"nproc": os.cpu_count(), "lscpu": "\n".join(run(["lscpu"]).splitlines()[:15]),
            "python": platform.python_version(), "mosquitto": run(["mosquitto", "-h"]).splitlines()[0:1],
            "paho": paho.mqtt.__version__, "psycopg": psycopg.__version__, "numba": numba.__version__,
            "aiocoap": aiocoap.meta.version if hasattr(aiocoap, "meta") else "", "loadavg": os.getloadavg()}


def fmt_cores(result: dict) -> str:
    ours = result.get("cores", {})
    if not ours:
        return ""
    cores = " ".join(f"{k} {v:.2f}" for k, v in sorted(ours.items()))
    machine_cores = result.get("machine_cores", 0)
    return (f"cores: {cores} | machine {machine_cores:.2f}, of which others' "
            f"{max(0.0, machine_cores - sum(ours.values())):.2f} | load {result.get('load', 0):.1f}")


def stats(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


class Report:
    def __init__(self, admin_url: str | None = None) -> None:
        self.runs: list[dict[str, dict]] = []
        self.once: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}
        self._admin_url = admin_url

    def checkpoint(self) -> None:
        """CHECKPOINT before each phase: one phase's dirty pages and WAL are not flushed during the
        next (with the stock max_wal_size of 1 GB a checkpoint otherwise lands in every few phases,
        and its writes compete with the phase's commits).  Needs a superuser; skipped without one."""
        if self._admin_url is None:
            return
        try:
            with psycopg.connect(self._admin_url, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
        except psycopg.Error as exc:
            self.say(f"(no CHECKPOINT between phases: {str(exc).splitlines()[0]})")
            self._admin_url = None

    def say(self, text: str) -> None:
        print(text, flush=True)

    def phase(self, repeat: int, key: str, fn) -> dict | None:
        self.checkpoint()
        t0 = time.time()
        try:
            result = fn()
            result["load"] = os.getloadavg()[0]
        except Exception as exc:  # a failed phase is reported, the others still run
            traceback.print_exc()
            self.skipped[key] = f"failed: {exc!r}"[:300]
            self.say(f"[{repeat}] {LABELS.get(key, key):42s} FAILED: {exc!r}"[:300])
            return None
        if repeat == 0:                      # measured once, not per repeat
            self.once[key] = result
        else:
            while len(self.runs) < repeat:
                self.runs.append({})
            self.runs[repeat - 1][key] = result
        extra = ""
        lat = result.get("latency", {}).get("publish_to_commit_ms")
        if lat:
            extra = f"  p50/p95/p99 publish→commit {lat[0]:.0f}/{lat[1]:.0f}/{lat[2]:.0f} ms"
        if result.get("latency_ms"):
            extra = "  p50/p95/p99 request→2.04 {:.0f}/{:.0f}/{:.0f} ms".format(*result["latency_ms"])
        self.say(f"[{repeat}] {LABELS.get(key, key):42s} {result['rate']:>12,.0f} /s{extra}  ({time.time() - t0:.0f} s)"
                 f"\n      {fmt_cores(result)}".rstrip())
        return result

    def figures(self, key: str) -> list[float]:
        return [r[key]["rate"] for r in self.runs if key in r]

    def ratios(self, num: str, den: str) -> list[float]:
        return [r[num]["rate"] / r[den]["rate"] for r in self.runs if num in r and den in r and r[den]["rate"]]

    def summary(self) -> list[str]:
        out = [f"{'figure':44s}{'min':>12s}{'median':>12s}{'max':>12s}"]
        for key, label in LABELS.items():
            vals = self.figures(key)
            if vals:
                out.append(f"{label:44s}" + "".join(f"{v:>12,.0f}" for v in stats(vals)))
        out += ["", f"{'ratio (same repeat)':44s}{'min':>9s}{'median':>9s}{'max':>9s}{'target':>9s}  verdict"]
        for name, num, den, target in TARGETS:
            vals = self.ratios(num, den)
            if not vals:
                why = self.skipped.get(num) or self.skipped.get(den) or "not measured"
                shown = "-" if target is None else f"{target:.2f}x"
                out.append(f"{name:44s}{'-':>9s}{'-':>9s}{'-':>9s}{shown:>9s}  not measured ({why})")
                continue
            lo, med, hi = stats(vals)
            verdict = ("-", "") if target is None else (f"{target:.2f}x", "PASS (median)" if med >= target
                                                        else "FAIL (median)")
            out.append(f"{name:44s}{lo:>8.2f}x{med:>8.2f}x{hi:>8.2f}x{verdict[0]:>9s}  {verdict[1]}".rstrip())
        return out

    def cpu_table(self) -> list[str]:
        out = ["", "CPU (cores busy, median over repeats; machine = every process on it; "
                   "others' = machine minus ours):"]
        for key, label in LABELS.items():
            rows = [r[key] for r in self.runs if key in r and "cores" in r[key]]
            if not rows:
                continue
            groups = sorted({g for r in rows for g in r["cores"]})
            cells = [f"{g} {statistics.median(r['cores'].get(g, 0) for r in rows):.2f}" for g in groups]
            machine_cores = statistics.median(r["machine_cores"] for r in rows)
            others = statistics.median(max(0.0, r["machine_cores"] - sum(r["cores"].values())) for r in rows)
            # CPU per uplink: of our processes, and of the gateway + PostgreSQL alone (what the write path costs)
            ours = statistics.median(sum(r["cores"].values()) * 1e6 / r["rate"] for r in rows if r.get("rate"))
            path = statistics.median((r["cores"].get("gateway", 0) + r["cores"].get("postgres", 0)) * 1e6 / r["rate"]
                                     for r in rows if r.get("rate"))
            out.append(f"  {label:40s} " + ", ".join(cells) + f" | machine {machine_cores:.2f}, others' {others:.2f}"
                       f" | CPU µs per uplink: ours {ours:.0f}, gateway+postgres {path:.0f}")
        return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from _coap import check_encoding, gateway_has_coap, run_coap
    from _memory import run_memory, run_outage, run_registry, spool_setting
    from _phases import make_bench, run_bare_subscriber, run_copy, run_gateway, run_naive, run_pipeline_alone, workdir
    from iotjx.broker import MosquittoProcess

    report = Report(args.pg_admin_url)
    info = machine()
    report.say(f"machine: {info['nproc']} cores, load {info['loadavg']}; Python {info['python']}, "
               f"{' '.join(info['mosquitto'])}, paho {info['paho']}, psycopg {info['psycopg']}, numba {info['numba']}")
    check_encoding()
    wd = workdir()
    conf = {}
    if args.broker_set:
        from broker_durability import variant_conf
        overrides = dict(item.split("=", 1) for item in args.broker_set)
        conf = {"base": variant_conf(overrides, wd / "broker-variant.conf")}
        report.say(f"broker configuration changed: {overrides}")
    broker = MosquittoProcess(wd / "mosquitto", **conf).start()
    # The broker is the secured one: the load logs in as its tester, the gateways as its gateway.
    os.environ.update(IOTJX_BENCH_MQTT_USERNAME=broker.tester_login["username"],
                      IOTJX_BENCH_MQTT_PASSWORD=broker.tester_login["password"])
    db = BenchDatabase(args.pg_admin_url, keep=args.keep_db)
    bench = None
    try:
        t0 = time.time()
        bench = make_bench(broker, db, args.devices, args.publishers, args.publisher, args.batch_size, wd)
        bench.listener = CommitListener(db.url)
        bench.mqtt_protocol = args.mqtt_protocol
        bench.gateway_env.update(IOTJX_MQTT_USERNAME=broker.gateway_login["username"],
                                 IOTJX_MQTT_PASSWORD=broker.gateway_login["password"])
        bench.gateway_cmd = tuple(shlex.split(args.gateway_cmd))
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            bench.profile_dir = args.profile.resolve()
        rounds = max(1, math.ceil(args.messages / args.devices))
        report.say(f"database {db.name}, broker {broker.url}, {args.devices:,} devices registered in "
                   f"{time.time() - t0:.1f} s; {rounds * args.devices:,} uplinks per MQTT run, "
                   f"{args.publishers} {args.publisher} publisher processes, batch size {args.batch_size}, "
                   f"MQTT {args.mqtt_protocol}")
        coap_missing = gateway_has_coap()
        for rep in range(1, args.repeats + 1):
            if "bare" not in args.skip:
                report.phase(rep, "bare", lambda: run_bare_subscriber(bench, rounds))
            report.phase(rep, "e2e_1", lambda: run_gateway(bench, rounds))
            if "plain" not in args.skip:     # the same without the rollups (what the aggregators cost)
                report.phase(rep, "e2e_plain", lambda: run_gateway(bench, rounds, extra_env={"IOTJX_ROLLUPS": "false"}))
            if "copy" not in args.skip and len(report.runs) >= rep and "e2e_1" in report.runs[rep - 1]:
                report.phase(rep, "copy", lambda: run_copy(bench))
            if "e2e_2" not in args.skip:
                report.phase(rep, "e2e_2", lambda: run_gateway(bench, rounds, processes=2))
                if "bare" not in args.skip:
                    report.phase(rep, "bare_2", lambda: run_bare_subscriber(bench, rounds, processes=2))
            if "pipeline" not in args.skip:
                report.phase(rep, "pipeline", lambda: run_pipeline_alone(bench, rounds))
            if "naive" not in args.skip:
                report.phase(rep, "naive", lambda: run_naive(bench, args.naive_messages))
            if "coap" not in args.skip:
                coap = (args.coap_requests, args.coap_clients, args.coap_endpoints)
                report.phase(rep, "coap_bare", lambda: run_coap(bench, *coap, target="bare"))
                if coap_missing:
                    report.skipped["coap_gateway"] = coap_missing
                    report.say(f"[{rep}] {LABELS['coap_gateway']:42s} skipped: {coap_missing}")
                else:
                    report.phase(rep, "coap_gateway", lambda: run_coap(bench, *coap, target="gateway"))
        e2e = report.figures("e2e_1")
        full_rate = statistics.median(e2e) if e2e else 20_000.0
        if "latency" not in args.skip:
            rate = args.latency_load * full_rate
            lat_rounds = max(1, math.ceil(rate * (5 if args.quick else 15) / args.devices))
            report.phase(0, "latency", lambda: {**run_gateway(bench, lat_rounds, rate=rate), "offered": rate})
        if "memory" not in args.skip:
            rate = args.memory_load * full_rate
            report.once["memory_short"] = run_memory(bench, args.memory_s, rate)
            report.say(f"memory, {args.memory_s:.0f} s at {rate:,.0f}/s offered: {report.once['memory_short']}")
            if args.long:
                report.once["memory_long"] = run_memory(bench, args.long_s, rate)
                report.say(f"memory, {args.long_s:.0f} s at {rate:,.0f}/s offered: {report.once['memory_long']}")
        if "outage" not in args.skip:
            if spool_setting() is None:
                report.skipped["outage"] = "the gateway has no spool yet (ingest/spool.py + a spool directory setting)"
                report.say(f"memory during a database outage: skipped: {report.skipped['outage']}")
            else:
                dur = 30.0 if args.quick else 90.0
                report.once["outage"] = run_outage(bench, dur, args.memory_load * full_rate, dur / 3)
                report.say(f"memory during a database outage: {report.once['outage']}")
        if "registry" not in args.skip and args.registry > 0:
            report.once["registry"] = run_registry(bench, args.registry, args.registry_touched)
            report.say(f"registry of {args.registry:,} devices: {report.once['registry']}")
        print_summary(report, args)
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                             "runs": report.runs, "once": report.once, "skipped": report.skipped},
                                            indent=1, default=str))
    finally:
        if bench is not None and bench.listener is not None:
            bench.listener.close()
        db.close()
        broker.stop()
        if not args.keep_db:
            shutil.rmtree(wd, ignore_errors=True)        # broker persistence, publish times, gateway logs
    return 0


def print_summary(report: Report, args) -> None:
    lines = ["", "=" * 100, f"summary over {args.repeats} repeats ({'quick' if args.quick else 'normal'} mode)"]
    lines += report.summary() + report.cpu_table()
    lat_rows = [("full rate (e2e, 1 process)", r["e2e_1"]["latency"]) for r in report.runs[:1] if "e2e_1" in r
                and "latency" in r["e2e_1"]]
    if "latency" in report.once:
        pace = report.once["latency"]
        lat_rows.append((f"paced at {pace['offered']:,.0f}/s", pace["latency"]))
    if lat_rows:
        lines += ["", "latency (ms)                       publish→commit p50/p95/p99   publish→gateway   "
                      "gateway→commit"]
        for name, lat in lat_rows:
            if "publish_to_commit_ms" in lat:
                lines.append(f"  {name:32s} " + "   ".join("/".join(f"{v:.0f}" for v in lat[k]) for k in (
                    "publish_to_commit_ms", "publish_to_gateway_ms", "gateway_to_commit_ms"))
                    + f"   ({lat['rows']:,} rows, {lat['missing_commit']} without a commit time)")
    for key in ("bare", "e2e_1", "e2e_2"):
        hw = [r[key]["hwm_mb"].get("gateway" if key != "bare" else "subscriber", 0) for r in report.runs if key in r]
        if hw:
            lines.append(f"  peak RSS (VmHWM), {LABELS[key]}: {max(hw):.0f} MiB")
    mem = report.once
    if "memory_short" in mem:
        short = mem["memory_short"]["hwm_mb"]
        lines.append(f"\nmemory: gateway VmHWM {short:.0f} MiB after {mem['memory_short']['duration_s']:.0f} s")
        if "memory_long" in mem:
            long_ = mem["memory_long"]["hwm_mb"]
            verdict = "PASS" if long_ <= 1.2 * short else "FAIL"
            lines.append(f"  {mem['memory_long']['duration_s']:.0f}-second run: {long_:.0f} MiB = "
                         f"{long_ / short:.2f} × the short run (target ≤ 1.20): {verdict}")
        else:
            lines.append("  10-minute run: not run (--long)")
    if "outage" in mem:
        lines.append(f"  during a database outage: {mem['outage']}")
    elif "outage" in report.skipped:
        lines.append(f"  during a database outage: skipped ({report.skipped['outage']})")
    if "registry" in mem:
        r = mem["registry"]
        lines.append(f"  registry of {r['registry']:,} devices, {r['touched']:,} of them sending: VmHWM "
                     f"{r['hwm_mb']:.0f} MiB at {r['rate']:,.0f}/s")
    for key, why in report.skipped.items():
        lines.append(f"  {key}: {why}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
