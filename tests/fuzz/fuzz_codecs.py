"""Fuzz every codec: random and mutated inputs through the numba batch and the reference decoder.

    python -m tests.fuzz.fuzz_codecs --codec cjt188 --count 1000000 --seed 1
    python -m tests.fuzz.fuzz_codecs --codec all --count 100000

For each codec whose module imports, inputs are random bytes and mutations (bit flips, byte
overwrites, truncations, insertions, deletions, splices) of valid payloads: ``sample_payloads`` for
binary codecs, the golden cases (``tests/decoders/cases/<codec>/*.hex``) for text codecs.  Every
input goes through ``decode_batch`` (in large batches) and through the reference ``decode``; the
reference may only return a dict or raise DecodeError, the batch must give the same reason or the
same record.  Prints the count per reason and inputs/s; exits 1 on any crash or disagreement and
writes each offending input as hex under ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import decoders
from decoders import DecodeError
from decoders.errors import REASONS

CASES = Path(__file__).resolve().parents[1] / "decoders" / "cases"
BATCH = 100_000
MAX_FINDINGS = 20


@dataclass
class FuzzResult:
    """What one codec's run found."""

    codec: str
    count: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)
    findings: list[tuple[str, bytes]] = field(default_factory=list)   # (what went wrong, input)
    batch_seconds: float = 0.0
    reference_seconds: float = 0.0
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or not self.findings


def seed_payloads(codec: str, seed: int) -> list[bytes]:
    """Valid payloads to mutate: sample_payloads for binary codecs, else the golden cases."""
    module = importlib.import_module(decoders.registry._MODULES[codec])
    sampler = getattr(module, "sample_payloads", None)
    if sampler is not None:
        try:
            return list(sampler(256, seed))
        except TypeError:
            pass
    cases = sorted((CASES / codec).glob("*.hex"))
    return [bytes.fromhex(p.read_text()) for p in cases] or [b"{}"]


def mutate(rng: random.Random, payload: bytes, seeds: list[bytes]) -> bytes:
    """`payload` with 1-4 random edits."""
    b = bytearray(payload)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(7)
        if op == 0 and b:                                   # bit flip
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:                                 # byte overwrite
            b[rng.randrange(len(b))] = rng.choice((0x00, 0xFF, 0xFE, 0x68, 0x16, rng.randrange(256)))
        elif op == 2 and b:                                 # truncation
            del b[rng.randrange(len(b)):]
        elif op == 3:                                       # insertion
            at = rng.randrange(len(b) + 1)
            b[at:at] = rng.randbytes(rng.randrange(1, 4))
        elif op == 4 and b:                                 # deletion
            at = rng.randrange(len(b))
            del b[at:at + rng.randrange(1, 4)]
        elif op == 5:                                       # splice with another valid payload
            other = rng.choice(seeds)
            b = b[:rng.randrange(len(b) + 1)] + other[rng.randrange(len(other) + 1):]
        else:                                               # duplicate a slice
            if b:
                at = rng.randrange(len(b))
                b[at:at] = b[at:at + rng.randrange(1, 8)]
    return bytes(b)


def generate(rng: random.Random, seeds: list[bytes], n: int) -> list[bytes]:
    """n inputs: 10 % random bytes, 5 % untouched seeds, the rest mutated seeds."""
    longest = max((len(s) for s in seeds), default=32)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.10:
            out.append(rng.randbytes(rng.randrange(2 * longest + 1)))
        elif r < 0.15:
            out.append(rng.choice(seeds))
        else:
            out.append(mutate(rng, rng.choice(seeds), seeds))
    return out


# SenML resolves relative times against "now": one fixed instant, or the batch and the reference
# decoders (called moments apart) would disagree on every relative time.
FIXED_NOW = {"senml-json": {"now": 1_800_000_000.0}, "senml-cbor": {"now": 1_800_000_000.0}}


def _reference(codec: str, payload: bytes) -> tuple[str | None, dict | None]:
    """(reason, record) from the reference decoder; anything but a dict or DecodeError propagates."""
    try:
        record = decoders.decode(codec, payload, FIXED_NOW.get(codec))
    except DecodeError as exc:
        return exc.reason, None
    if not isinstance(record, dict):
        raise TypeError(f"reference decoder returned {type(record).__name__}, not dict")
    return None, record


def fuzz_codec(codec: str, count: int, seed: int, log: Callable[[str], None] = print) -> FuzzResult:
    """Runs `count` inputs through one codec; never raises for what the codec does."""
    result = FuzzResult(codec)
    try:
        decoders.get_codec(codec)
        seeds = seed_payloads(codec, seed)
    except Exception as exc:                               # a module still being written elsewhere
        result.skipped = f"{type(exc).__name__}: {exc}"
        log(f"{codec}: skipped, its module does not import ({result.skipped})")
        return result
    rng = random.Random(seed)
    done = 0
    while done < count and len(result.findings) < MAX_FINDINGS:
        inputs = generate(rng, seeds, min(BATCH, count - done))
        t0 = time.perf_counter()
        try:
            batch = decoders.decode_batch(codec, inputs, FIXED_NOW.get(codec))
        except Exception:
            result.findings.append((f"decode_batch raised:\n{traceback.format_exc()}", b"".join(inputs[:1])))
            for one in inputs:                              # find the input that does it
                try:
                    decoders.decode_batch(codec, [one], FIXED_NOW.get(codec))
                except Exception:
                    result.findings.append(("decode_batch raised on this input", one))
                    break
            break
        t1 = time.perf_counter()
        result.batch_seconds += t1 - t0
        for i, payload in enumerate(inputs):
            try:
                reason, record = _reference(codec, payload)
            except Exception:
                result.findings.append((f"reference raised:\n{traceback.format_exc()}", payload))
                continue
            batch_reason = batch.reason(i)
            if batch_reason != reason:
                result.findings.append((f"reference says {reason}, batch says {batch_reason}", payload))
            elif record is not None:
                try:
                    batch_record = batch.record(i)
                except Exception:
                    result.findings.append((f"batch.record raised:\n{traceback.format_exc()}", payload))
                    continue
                if batch_record != record:
                    result.findings.append((f"records differ:\n  reference {record}\n  batch     {batch_record}",
                                            payload))
            result.reasons[reason or "ok"] += 1
            if len(result.findings) >= MAX_FINDINGS:
                break
        result.reference_seconds += time.perf_counter() - t1
        done += len(inputs)
        result.count = done
        log(f"{codec}: {done:,} / {count:,}")
    return result


def report(result: FuzzResult, out: Path) -> list[str]:
    """Printable lines for one codec; writes each finding's input as hex under `out`."""
    if result.skipped:
        return [f"{result.codec}: SKIPPED ({result.skipped})"]
    lines = [f"{result.codec}: {result.count:,} inputs, "
             f"batch {result.count / max(result.batch_seconds, 1e-9):,.0f}/s, "
             f"reference + comparison {result.count / max(result.reference_seconds, 1e-9):,.0f}/s, "
             f"{'OK: no crash, no disagreement' if result.ok else f'{len(result.findings)} FINDINGS'}"]
    order = {name: i for i, name in enumerate(REASONS)}
    for reason, n in sorted(result.reasons.items(), key=lambda kv: order.get(kv[0], 99)):
        lines.append(f"    {reason:<14} {n:>10,}")
    if result.findings:
        out.mkdir(parents=True, exist_ok=True)
        for k, (what, payload) in enumerate(result.findings):
            path = out / f"{result.codec}-{k}.hex"
            path.write_text(payload.hex(" ").upper() + "\n")
            lines.append(f"  finding {k}: {what}\n    input ({path}): {payload.hex(' ').upper()}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codec", default="all", help="a codec name or 'all'")
    parser.add_argument("--count", type=int, default=1_000_000, help="inputs per codec")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="where offending inputs go")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    names = decoders.codec_names() if args.codec == "all" else [args.codec]
    if args.codec != "all" and args.codec not in names:
        parser.error(f"unknown codec {args.codec!r}")
    failed = False
    for name in names:
        started = time.perf_counter()
        result = fuzz_codec(name, args.count, args.seed, (lambda s: None) if args.quiet else print)
        for line in report(result, args.out):
            print(line)
        if not result.skipped:
            print(f"    wall time {time.perf_counter() - started:.1f} s (seed {args.seed})")
        failed |= not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
