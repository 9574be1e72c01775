"""Ingest metrics: what arrived, what became of it, how long batches take, what waits.

`IngestMetrics` counts in the gateway (thread-safe, cheap: one lock per batch, not per uplink);
`snapshot()` is a JSON-able dict, so the gateway can put it in its heartbeat row and /health can show
it; `render_prometheus` turns one or more snapshots into the Prometheus text exposition format.

The codec of an uplink is decided by the device registry in the writer, never by the transport, so
`received` and `spooled` (counted before the registry is asked) are per transport; `stored`,
`duplicate` and `rejected` are per transport and codec.  `rejects_suppressed` counts, per transport
and reason, the rejects past the per-source rate that were counted in reject_tally instead of
written as rows (they are in `rejected` too)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PER_TRANSPORT = ("received", "spooled", "replayed")
PER_CODEC = ("stored", "duplicate", "rejected")
UNKNOWN_CODEC = "unknown"


class IngestMetrics:
    """Counters by transport (and codec), batch latency as a histogram and as p50/p95 of a window."""

    def __init__(self, window: int = 512) -> None:
        self._lock = threading.Lock()
        self._transport: dict[str, Counter[str]] = {k: Counter() for k in PER_TRANSPORT}
        self._codec: dict[str, Counter[tuple[str, str]]] = {k: Counter() for k in PER_CODEC}
        self._reasons: Counter[str] = Counter()
        self._suppressed: Counter[tuple[str, str]] = Counter()     # (transport, reason)
        self._buckets = [0] * (len(BATCH_BUCKETS) + 1)
        self._batch_sum = 0.0
        self._batch_count = 0
        self._batch_uplinks = 0
        self._recent: deque[float] = deque(maxlen=window)

    def count(self, event: str, by_transport: Mapping[str, int]) -> None:
        """`received` / `spooled` / `replayed` uplinks, per transport."""
        with self._lock:
            self._transport[event].update(by_transport)

    def outcomes(self, by_key: Mapping[tuple[str, str, str], int], reasons: Mapping[str, int],
                 suppressed: Mapping[tuple[str, str], int] | None = None) -> None:
        """One committed batch: counts per (status, transport, codec), reject reasons, and the
        rejects only counted (not written) per (transport, reason)."""
        with self._lock:
            for (status, transport, codec), n in by_key.items():
                self._codec[status][(transport, codec)] += n
            self._reasons.update(reasons)
            if suppressed:
                self._suppressed.update(suppressed)

    def batch(self, seconds: float, uplinks: int) -> None:
        """A batch committed after `seconds` (collect → commit)."""
        with self._lock:
            self._buckets[bisect.bisect_left(BATCH_BUCKETS, seconds)] += 1
            self._batch_sum += seconds
            self._batch_count += 1
            self._batch_uplinks += uplinks
            self._recent.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain JSON-able data (nested dicts: event → transport [→ codec] → count)."""
        with self._lock:
            out: dict[str, Any] = {k: dict(c) for k, c in self._transport.items()}
            for status, counter in self._codec.items():
                nested: dict[str, dict[str, int]] = {}
                for (transport, codec), n in counter.items():
                    nested.setdefault(transport, {})[codec] = n
                out[status] = nested
            out["rejected_by_reason"] = dict(self._reasons)
            nested = {}
            for (transport, reason), n in self._suppressed.items():
                nested.setdefault(transport, {})[reason] = n
            out["rejects_suppressed"] = nested
            recent = sorted(self._recent)
            out["batch_seconds"] = {
                "buckets": list(BATCH_BUCKETS), "counts": list(self._buckets), "sum": self._batch_sum,
                "count": self._batch_count, "uplinks": self._batch_uplinks,
                "p50": _quantile(recent, 0.50), "p95": _quantile(recent, 0.95), "window": len(recent)}
        return out


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def render_prometheus(snapshots: Mapping[str, Mapping[str, Any]]) -> str:
    """Prometheus text format (version 0.0.4) for gateway id → snapshot, as `Pipeline.metrics_snapshot`
    returns it (counters, batch histogram, and the gauges `queue_depth` and `spool`)."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str, samples: list[tuple[str, dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{suffix}{{{text}}} {_number(value)}")

    helps = {"received": "Uplinks handed to the pipeline by a transport",
             "spooled": "Uplinks written to the on-disk spool (the database was away or slow)",
             "replayed": "Spooled uplinks replayed into the database",
             "stored": "Uplinks committed with their readings",
             "duplicate": "Uplinks recognised as already stored (retransmission, redelivery)",
             "rejected": "Uplinks kept in the rejects table with a reason"}
    for event in PER_TRANSPORT:
        family(f"iotjx_ingest_{event}_total", "counter", helps[event],
               [("", {"gateway": g, "transport": t}, n)
                for g, s in snapshots.items() for t, n in sorted((s.get(event) or {}).items())])
    for event in PER_CODEC:
        family(f"iotjx_ingest_{event}_total", "counter", helps[event],
               [("", {"gateway": g, "transport": t, "codec": c}, n)
                for g, s in snapshots.items() for t, codecs in sorted((s.get(event) or {}).items())
                for c, n in sorted(codecs.items())])
    family("iotjx_ingest_rejected_reason_total", "counter", "Rejected uplinks by reject reason",
           [("", {"gateway": g, "reason": r}, n)
            for g, s in snapshots.items() for r, n in sorted((s.get("rejected_by_reason") or {}).items())])
    family("iotjx_ingest_rejects_suppressed_total", "counter",
           "Rejects past the per-source rate: counted in reject_tally, not written as rows",
           [("", {"gateway": g, "transport": t, "reason": r}, n)
            for g, s in snapshots.items() for t, reasons in sorted((s.get("rejects_suppressed") or {}).items())
            for r, n in sorted(reasons.items())])
    samples: list[tuple[str, dict[str, str], float]] = []
    for g, s in snapshots.items():
        h = s.get("batch_seconds")
        if not h:
            continue
        running = 0
        for bound, n in zip([*h["buckets"], float("inf")], h["counts"], strict=True):
            running += n
            samples.append(("_bucket", {"gateway": g, "le": _number(bound)}, running))
        samples.append(("_sum", {"gateway": g}, h["sum"]))
        samples.append(("_count", {"gateway": g}, h["count"]))
    family("iotjx_ingest_batch_seconds", "histogram", "Time from a batch's hand-over to its commit", samples)
    gauges = [
        ("queue_depth", "Uplinks waiting in memory for the writer", lambda s: s.get("queue_depth")),
        ("queue_bytes", "Payload bytes waiting in memory for the writer", lambda s: s.get("queue_bytes")),
        ("spool_bytes", "Bytes in the on-disk spool", lambda s: _spool(s, "bytes")),
        ("spool_limit_bytes", "The spool's byte limit (backpressure beyond it)", lambda s: _spool(s, "limit_bytes")),
        ("spool_uplinks", "Uplinks in the on-disk spool", lambda s: _spool(s, "uplinks")),
        ("spool_segments", "Batches (segment files) in the on-disk spool", lambda s: _spool(s, "segments")),
        ("spool_age_seconds", "Age of the oldest spooled uplink", lambda s: _spool(s, "age_s")),
        ("spooling", "1 while uplinks go to the spool instead of the database",
         lambda s: None if not s.get("spool") else int(s["spool"].get("mode") == "spooling")),
        ("backpressure", "1 while the spool is full and transports are no longer acknowledged",
         lambda s: None if not s.get("spool") else int(bool(s["spool"].get("full")))),
    ]
    for name, help_, get in gauges:
        values = [(g, get(s)) for g, s in snapshots.items()]
        family(f"iotjx_ingest_{name}", "gauge", help_,
               [("", {"gateway": g}, v) for g, v in values if v is not None])
    return "\n".join(out) + "\n"


def _spool(snapshot: Mapping[str, Any], key: str) -> float | None:
    spool = snapshot.get("spool")
    return None if not spool or not spool.get("enabled") else spool.get(key)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return repr(float(value))
