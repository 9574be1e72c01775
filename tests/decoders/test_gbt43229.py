"""GB/T 43229 real-time flow codec: golden cases, CRC variants, reference == numba kernel."""

from __future__ import annotations

import binascii
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import decoders
from decoders import DecodeError
from decoders.gbt43229 import DEFAULT_SETTINGS, LANE_KEYS, encode_frame, sample_payloads
from decoders.gbt43229_crc import crc16, crc16_kernel

CASES = Path(__file__).parent / "cases" / "gbt43229"
CASE_NAMES = sorted(p.stem for p in CASES.glob("*.json"))
ALL_SETTINGS = [{"byte_order": order, "crc": crc, "content_length_field": field}
                for order in ("little", "big") for crc in ("modbus", "ccitt-false", "none")
                for field in (True, False)]
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load(name: str) -> tuple[bytes, dict]:
    frame = bytes.fromhex((CASES / f"{name}.hex").read_text().strip())
    return frame, json.loads((CASES / f"{name}.json").read_text())


def _outcome(payload: bytes, cfg: dict):
    try:
        return decoders.decode("gbt43229", payload, cfg)
    except DecodeError as exc:
        return exc.reason


def _batch_outcomes(payloads: list[bytes], cfg: dict) -> list:
    batch = decoders.decode_batch("gbt43229", payloads, cfg)
    return [batch.reason(i) or batch.record(i) for i in range(len(batch))]


# --------------------------------------------------------------------------- CRC variants

@pytest.mark.parametrize(("kind", "check"), [("modbus", 0x4B37), ("ccitt-false", 0x29B1), ("none", 0)])
def test_crc_matches_the_catalogue_check_value(kind, check):
    data = b"123456789"
    kernel_kind = {"none": 0, "modbus": 1, "ccitt-false": 2}[kind]
    assert crc16(data, kind) == check
    assert crc16_kernel(np.frombuffer(data, np.uint8), 0, 9, kernel_kind) == check


def test_ccitt_false_agrees_with_the_standard_library():
    for data in (b"", b"\x00", b"\xc0\xdb\xff" * 7, bytes(range(256))):
        assert crc16(data, "ccitt-false") == binascii.crc_hqx(data, 0xFFFF)


# --------------------------------------------------------------------------- golden cases

def _subset_equal(expected: dict, actual: dict) -> None:
    for key, value in expected.items():
        assert actual[key] == value, key


@pytest.mark.parametrize("name", CASE_NAMES)
def test_golden_case(name):
    frame, case = _load(name)
    cfg = {**DEFAULT_SETTINGS, **case.get("settings", {})}
    batch = decoders.decode_batch("gbt43229", [frame], cfg)
    if "reason" in case:
        with pytest.raises(DecodeError) as exc:
            decoders.decode("gbt43229", frame, cfg)
        assert exc.value.reason == case["reason"]
        assert batch.reason(0) == case["reason"]
    else:
        record = decoders.decode("gbt43229", frame, cfg)
        _subset_equal(case["expected"], record)
        assert batch.record(0) == record


def test_there_are_enough_golden_cases():
    kinds = [json.loads((CASES / f"{n}.json").read_text()) for n in CASE_NAMES]
    assert sum("expected" in k for k in kinds) >= 5
    assert {k.get("reason") for k in kinds} >= {"checksum", "truncated", "length", "framing"}


def test_both_byte_orders_put_nanchang_where_the_docs_say():
    fields = {"division_code": 360100, "device_type": 16, "device_number": 7, "lanes": []}
    little = encode_frame(fields, DEFAULT_SETTINGS)
    big = encode_frame(fields, {**DEFAULT_SETTINGS, "byte_order": "big"})
    assert little[3:6] == bytes.fromhex("A47E05")       # 360100 = 0x057EA4
    assert big[3:6] == bytes.fromhex("057EA4")


def test_a_frame_checked_with_the_wrong_crc_variant_is_rejected():
    frame = sample_payloads(1, seed=5)[0]
    assert _outcome(frame, {**DEFAULT_SETTINGS, "crc": "ccitt-false"}) == "checksum"
    assert isinstance(_outcome(frame, {**DEFAULT_SETTINGS, "crc": "none"}), dict)


def test_unknown_settings_are_refused():
    frame = sample_payloads(1)[0]
    with pytest.raises(ValueError):
        decoders.decode("gbt43229", frame, {"byte_order": "middle"})
    with pytest.raises(ValueError):
        decoders.decode_batch("gbt43229", [frame], {"crc": "crc32"})


def test_lanes_table_reassembles_per_frame():
    good = sample_payloads(3, seed=11)
    payloads = [good[0], b"\xc0\x00", good[1], b"", good[2]]
    batch = decoders.decode_batch("gbt43229", payloads)
    expected_lanes = [len(decoders.decode("gbt43229", p)["lanes"]) for p in good]
    assert len(batch.columns["lane_frame"]) == sum(expected_lanes)
    assert list(np.unique(batch.columns["lane_frame"])) == [i for i, n in zip((0, 2, 4), expected_lanes) if n]
    for i, p in zip((0, 2, 4), good):
        assert batch.record(i) == decoders.decode("gbt43229", p)
    assert [batch.reason(1), batch.reason(3)] == ["truncated", "empty"]


# --------------------------------------------------------------------------- properties

tenths = st.one_of(st.none(), st.integers(0, 254).map(lambda v: v / 10))
lanes = st.fixed_dictionaries({
    "channel": st.integers(0, 255),
    "count_a": st.one_of(st.none(), st.integers(0, 254)),
    "count_b": st.one_of(st.none(), st.integers(0, 254)),
    "count_c": st.one_of(st.none(), st.integers(0, 254)),
    "occupancy_pct": st.one_of(st.none(), st.integers(0, 1000).map(lambda v: v / 10)),
    "speed_kmh": st.one_of(st.none(), st.integers(0, 254)),
    "length_m": st.one_of(st.none(), st.integers(0, 65534).map(lambda v: v / 10)),
    "headway_s": tenths, "gap_s": tenths, "stops": tenths, "stop_duration_s": tenths,
    "presence": st.lists(st.integers(0, 255), max_size=12),
})
frames = st.fixed_dictionaries({
    "division_code": st.integers(0, (1 << 24) - 1),
    "device_type": st.integers(0, 0xFFFF),
    "device_number": st.integers(0, 0xFFFF),
    "receiver_division_code": st.integers(0, (1 << 24) - 1),
    "operation": st.sampled_from((0x82, 0x83)),
    "lanes": st.lists(lanes, max_size=6),
})


@FAST
@given(fields=frames, cfg=st.sampled_from(ALL_SETTINGS))
def test_round_trip_and_kernel_agree_on_valid_frames(fields, cfg):
    frame = encode_frame(fields, cfg)
    record = decoders.decode("gbt43229", frame, cfg)
    assert record["division_code"] == fields["division_code"]
    assert record["operation"] == fields["operation"]
    for sent, got in zip(fields["lanes"], record["lanes"], strict=True):
        for key in LANE_KEYS[:-2]:
            assert got[key] == sent[key], key
        assert got["presence_samples"] == len(sent["presence"])
        assert got["presence_occupied"] == sum(1 for b in sent["presence"] if b)
    assert _batch_outcomes([frame], cfg) == [record]


def _mutate(frame: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    data = bytearray(frame)
    for op, pos, value in ops:
        if not data:
            break
        pos %= len(data)
        if op == 0:
            data[pos] = value
        elif op == 1:
            del data[pos]
        elif op == 2:
            data.insert(pos, value)
        else:
            del data[pos:]
    return bytes(data)


mutations = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4096), st.sampled_from((0xC0, 0xDB, 0xDC, 0xDD, 0x00, 0xFF, 0x03, 0x82))), min_size=1, max_size=4)


@FAST
@given(fields=frames, cfg=st.sampled_from(ALL_SETTINGS), ops=mutations)
def test_kernel_matches_reference_on_mutated_frames(fields, cfg, ops):
    payload = _mutate(encode_frame(fields, cfg), ops)
    assert _batch_outcomes([payload], cfg) == [_outcome(payload, cfg)]


@FAST
@given(payloads=st.lists(st.one_of(st.binary(max_size=80),
                                   st.binary(max_size=60).map(lambda b: b"\xc0" + b + b"\xc0")), max_size=8),
       cfg=st.sampled_from(ALL_SETTINGS))
def test_kernel_matches_reference_on_random_bytes(payloads, cfg):
    assert _batch_outcomes(payloads, cfg) == [_outcome(p, cfg) for p in payloads]


def test_sample_payloads_decode_and_vary():
    payloads = sample_payloads(50, seed=2)
    batch = decoders.decode_batch("gbt43229", payloads)
    assert not batch.status.any()
    assert len({decoders.decode("gbt43229", p)["division_code"] for p in payloads}) > 5
    assert sample_payloads(5, seed=2) == payloads[:5]
