"""GB/T 26875.3-2011: golden frames from public sources, reference vs numba agreement, round trips."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoders import DecodeError, decode, decode_batch, encode
from decoders.gb26875 import split_frames
from decoders.gb26875_encode import heartbeat, random_object, sample_payloads, smoke_alarm

CASES = Path(__file__).parent / "cases" / "gb26875"
CASE_NAMES = sorted(p.stem for p in CASES.glob("*.json"))
APP_TYPES = (1, 2, 3, 4, 5, 8, 21, 24, 25, 28)
SETTINGS = ({"checksum_from": "serial"}, {"checksum_from": "command"},
            {"checksum_from": "command", "tz_offset_minutes": 0})
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load(name: str) -> tuple[bytes, dict[str, Any]]:
    return bytes.fromhex((CASES / f"{name}.hex").read_text().strip()), json.loads((CASES / f"{name}.json").read_text())


def _plain(value: Any) -> Any:
    """A record in the golden files' JSON terms: ISO datetimes, flags as the sorted names that are set."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: sorted(n for n, on in v.items() if on) if k == "flags" else _plain(v) for k, v in value.items()}
    return value


def _outcome(payload: bytes, cfg: dict[str, Any]) -> tuple[str, Any]:
    try:
        return "ok", decode("gb26875", payload, cfg)
    except DecodeError as exc:
        return exc.reason, None


def _assert_agree(payloads: list[bytes], cfg: dict[str, Any] | None = None) -> None:
    cfg = cfg or {}
    batch = decode_batch("gb26875", payloads, cfg)
    assert len(batch) == len(payloads)
    for i, payload in enumerate(payloads):
        reason, record = _outcome(payload, cfg)
        assert (batch.reason(i) or "ok") == reason, payload.hex()
        if record is not None:
            assert batch.record(i) == record, payload.hex()


# --------------------------------------------------------------------------- golden cases

def test_at_least_five_real_frames_and_every_reason_kind() -> None:
    docs = [_load(name)[1] for name in CASE_NAMES]
    real = [d for d in docs if "expected" in d and "wrapped by hand" not in d["source"]
            and "Derived" not in d["source"] and "recomputed" not in d["source"]]
    assert len(real) >= 5
    assert {"checksum", "truncated", "length", "framing", "time", "unsupported"} <= {d.get("reason") for d in docs}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_golden_case(name: str) -> None:
    payload, doc = _load(name)
    cfg = doc.get("settings", {})
    if "reason" in doc:
        with pytest.raises(DecodeError) as info:
            decode("gb26875", payload, cfg)
        assert info.value.reason == doc["reason"]
    else:
        assert _plain(decode("gb26875", payload, cfg)) == doc["expected"]
    _assert_agree([payload], cfg)


def test_golden_cases_in_one_batch() -> None:
    """The kernel's flat objects table maps each frame to its own objects when frames are mixed."""
    payloads = [_load(name)[0] for name in CASE_NAMES]
    batch = decode_batch("gb26875", payloads)
    for i, name in enumerate(CASE_NAMES):
        doc = _load(name)[1]
        if "expected" in doc and not doc.get("settings"):
            assert _plain(batch.record(i)) == doc["expected"], name


def test_checksum_0x23_frame_ends_with_three_23() -> None:
    payload, _ = _load("f9164_doc_state_checksum_23")
    assert payload.endswith(b"###")
    assert decode("gb26875", payload)["object_count"] == 2


def test_split_frames_by_length_not_by_delimiter() -> None:
    doc_state = _load("f9164_doc_state_checksum_23")[0]
    alarm = _load("f9164_fire_alarm_no_description")[0]
    frames, rest = split_frames(doc_state + alarm + alarm[:10])
    assert frames == [doc_state, alarm]
    assert rest == alarm[:10]
    frames, rest = split_frames(b"\x00\x01" + alarm * 26)   # the junk comes out as one piece to reject
    assert frames[0] == b"\x00\x01" and frames[1:] == [alarm] * 26 and rest == b""
    assert _outcome(frames[0], {})[0] == "framing"


# --------------------------------------------------------------------------- encoder

def test_heartbeat_and_smoke_alarm_helpers() -> None:
    when = datetime(2025, 3, 1, 4, 5, 6, tzinfo=UTC)
    beat = decode("gb26875", encode("gb26875", heartbeat(0xFF0600000001, when, serial=9)))
    assert beat["app_type"] == 21 and beat["serial"] == 9 and beat["sent_at"] == when
    assert beat["objects"][0]["flags"]["normal_running"] and not beat["objects"][0]["flags"]["fire_alarm"]
    for description in ("3楼东侧烟感", None):
        frame = encode("gb26875", smoke_alarm(0xFF0600000001, 77, when, description))
        assert len(frame) == 30 + 2 + (46 if description else 15)
        obj = decode("gb26875", frame)["objects"][0]
        assert obj["state"] == 0b100011 and obj["flags"]["fire_alarm"] and obj["description"] == description


def test_encoder_analog_value_in_units() -> None:
    fields = {"app_type": 3, "objects": [{"analog_type": 4, "value": 0.35, "component_type": 0x79},
                                         {"analog_type": 3, "value": -12.5}]}
    frame = encode("gb26875", fields)
    objs = decode("gb26875", frame)["objects"]
    assert [(o["raw"], o["value"], o["unit"]) for o in objs] == [(4, 0.4, "MPa"), (-125, -12.5, "°C")]


def test_header_time_and_version_are_as_sent() -> None:
    when = datetime(2024, 2, 29, 15, 59, 59, tzinfo=UTC)   # 23:59:59 China time
    frame = encode("gb26875", {"version": "1.0", "sent_at": when, "command": 3})
    assert frame[6:12] == bytes((59, 59, 23, 29, 2, 24))
    record = decode("gb26875", frame)
    assert (record["version"], record["sent_at"], record["app_type"], record["objects"]) == ("1.0", when, None, [])


def _expected_object(app_type: int, obj: dict[str, Any], with_description: bool) -> dict[str, Any]:
    """What the decoder must return for an encoded random object, from the fields alone."""
    time = obj["time"]
    bits = lambda word, names: {n: bool(word >> i & 1) for i, n in enumerate(names)}  # noqa: E731
    comp = ("normal_running", "fire_alarm", "fault", "shielded", "supervisory", "started", "feedback", "delay")
    system = {"system_type": obj["system_type"], "system_address": obj["system_address"]}
    component = {**system, "component_type": obj["component_type"], "component_address": obj["component_address"]}
    if app_type == 1:
        names = comp + ("main_power_fault", "backup_power_fault", "bus_fault", "manual_mode", "config_changed",
                        "reset")
        return {**system, "state": obj["state"], "flags": bits(obj["state"], names), "time": time}
    if app_type == 2:
        return {**component, "state": obj["state"], "flags": bits(obj["state"], comp + ("power_fault",)),
                "description": obj["description"] if with_description else None, "time": time}
    if app_type == 3:
        divisor, unit = {3: (10, "°C"), 4: (10, "MPa"), 5: (10, "kPa"), 6: (10, "%LEL")}.get(
            obj["analog_type"], (1, None))
        return {**component, "analog_type": obj["analog_type"], "raw": obj["raw"], "value": obj["raw"] / divisor,
                "unit": unit, "time": time}
    ops = {4: ("reset", "mute", "manual_alarm", "alarm_cancel", "self_test", "confirm", "test"),
           24: ("reset", "mute", "manual_alarm", "alarm_cancel", "self_check", "inspection_reply", "test")}
    if app_type == 4:
        return {**system, "operation": obj["operation"], "flags": bits(obj["operation"], ops[4]),
                "operator": obj["operator"], "time": time}
    if app_type in (5, 25):
        return {**(system if app_type == 5 else {}), "software_version": obj["software_version"]}
    if app_type == 8:
        return {**system, "time": time}
    if app_type == 21:
        names = ("normal_running", "fire_alarm", "fault", "main_power_fault", "backup_power_fault",
                 "centre_link_fault", "monitoring_line_fault")
        return {"state": obj["state"], "flags": bits(obj["state"], names), "time": time}
    if app_type == 24:
        return {"operation": obj["operation"], "flags": bits(obj["operation"], ops[24]),
                "operator": obj["operator"], "time": time}
    return {"time": time}


@st.composite
def frame_fields(draw: st.DrawFn) -> dict[str, Any]:
    rng = random.Random(draw(st.integers(0, 2**32)))
    app_type = draw(st.sampled_from(APP_TYPES))
    when = datetime(2000, 1, 2, tzinfo=UTC) + timedelta(seconds=draw(st.integers(0, 255 * 365 * 86400)))
    count = draw(st.integers(0, 5))
    return {"serial": draw(st.integers(0, 0xFFFF)), "version": f"{draw(st.integers(0, 255))}.{rng.randrange(256)}",
            "sent_at": draw(st.sampled_from((when, None))), "source_address": draw(st.integers(0, 2**48 - 1)),
            "destination_address": rng.randrange(2**48), "command": draw(st.integers(0, 255)),
            "app_type": app_type, "objects": [random_object(rng, app_type, when) for _ in range(count)],
            "with_description": draw(st.booleans())}


@FAST
@given(frame_fields(), st.sampled_from(SETTINGS))
def test_round_trip_against_the_fields(fields: dict[str, Any], cfg: dict[str, Any]) -> None:
    frame = encode("gb26875", fields, cfg)
    record = decode("gb26875", frame, cfg)
    app_type = fields["app_type"]
    with_description = fields["with_description"] or not fields["objects"]
    expected_objects = [_expected_object(app_type, o, with_description) for o in fields["objects"]]
    assert record == {
        "serial": fields["serial"], "version": fields["version"], "sent_at": fields["sent_at"],
        "source_address": fields["source_address"], "destination_address": fields["destination_address"],
        "command": fields["command"], "app_type": app_type, "object_count": len(fields["objects"]),
        "objects": expected_objects,
    }
    _assert_agree([frame], cfg)


# --------------------------------------------------------------------------- reference == kernel on anything

def _mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    kind = rng.randrange(7)
    if kind == 0 and data:
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        del data[rng.randrange(len(data) + 1):]
    elif kind == 2:
        data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
    elif kind == 3 and len(data) > 29:                      # keep the checksum right to reach the ADU checks
        data[rng.randrange(26, len(data) - 3)] = rng.randrange(256)
        data[-3] = sum(data[2:-3]) & 0xFF
    elif kind == 4 and len(data) > 30:                      # a wrong date in some time label
        data[rng.choice((10, rng.randrange(27, len(data) - 3)))] = rng.choice((0, 13, 31, 60, 255))
        data[-3] = sum(data[2:-3]) & 0xFF
    elif kind == 5:
        data[24:26] = rng.randrange(1100).to_bytes(2, "little")
    else:
        data += frame
    return bytes(data)


@FAST
@given(st.integers(0, 2**32), st.sampled_from(SETTINGS))
def test_reference_and_kernel_agree_on_mutated_frames(seed: int, cfg: dict[str, Any]) -> None:
    rng = random.Random(seed)
    frames = sample_payloads(8, seed)
    _assert_agree(frames + [_mutate(rng.choice(frames), rng) for _ in range(24)], cfg)


@FAST
@given(st.lists(st.binary(max_size=120), max_size=20),
       st.lists(st.tuples(st.integers(0, 1100), st.binary(max_size=80)), max_size=10))
def test_reference_and_kernel_agree_on_random_bytes(blobs: list[bytes], headed: list[tuple[int, bytes]]) -> None:
    # Bare random bytes rarely pass '@@'; also try '@@' + a plausible header with a random tail.
    framed = [b"@@" + bytes(22) + n.to_bytes(2, "little") + tail for n, tail in headed]
    _assert_agree(blobs + framed)


def test_no_input_raises_out_of_a_batch() -> None:
    rng = random.Random(7)
    frames = sample_payloads(200, 3)
    junk = [bytes(rng.randrange(256) for _ in range(rng.randrange(80))) for _ in range(500)]
    junk += [_mutate(rng.choice(frames), rng) for _ in range(2000)]
    batch = decode_batch("gb26875", junk + frames)
    assert len(batch) == len(junk) + len(frames)
    assert (batch.status[len(junk):] == 0).all()
    batch = decode_batch("gb26875", [])
    assert len(batch) == 0


def test_kernel_refuses_an_unknown_checksum_start() -> None:
    with pytest.raises(ValueError, match="checksum_from"):
        decode_batch("gb26875", sample_payloads(1), {"checksum_from": "length"})
    with pytest.raises(ValueError, match="checksum_from"):
        decode("gb26875", sample_payloads(1)[0], {"checksum_from": "length"})
