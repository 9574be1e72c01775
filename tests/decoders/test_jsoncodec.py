"""JSON uplinks from Cat-1 devices: cases, time parsing, name maps, round trips, and fuzz."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tests.decoders.golden import plain
from decoders import DecodeError, decode, decode_batch, encode
from decoders.jsoncodec import parse_time

CASES = Path(__file__).parent / "cases" / "json"


@pytest.mark.parametrize("meta_path", sorted(CASES.glob("*.json")), ids=lambda p: p.stem)
def test_golden(meta_path):
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    payload = meta_path.with_suffix(".txt").read_bytes()
    assert meta["source"]
    if "reason" in meta:
        with pytest.raises(DecodeError) as err:
            decode("json", payload, meta.get("settings"))
        assert err.value.reason == meta["reason"]
        assert decode_batch("json", [payload], meta.get("settings")).reason(0) == meta["reason"]
        return
    result = decode("json", payload, meta.get("settings"))
    for key, want in meta["expected"].items():
        assert plain(result[key]) == want, key


@pytest.mark.parametrize(("raw", "want"), [
    (1767225600, datetime(2026, 1, 1, tzinfo=UTC)),
    (1767225600000, datetime(2026, 1, 1, tzinfo=UTC)),
    ("1767225600.5", datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
    ("2026-01-01T00:00:00Z", datetime(2026, 1, 1, tzinfo=UTC)),
    ("2026-01-01T08:00:00+08:00", datetime(2026, 1, 1, tzinfo=UTC)),
    ("2026-01-01T08:00:00", datetime(2026, 1, 1, tzinfo=UTC)),          # naive: China local time
])
def test_time_forms(raw, want):
    assert parse_time(raw, "ts", 480) == want


@pytest.mark.parametrize(("raw", "reason"), [(-1, "value"), ("soon", "value"), ([1], "schema"), (1e300, "value")])
def test_bad_times(raw, reason):
    with pytest.raises(DecodeError) as err:
        parse_time(raw, "ts", 480)
    assert err.value.reason == reason


def test_radio_fields_come_along():
    got = decode("json", b'{"rsrp":110,"sinr":-3,"pci":12,"ecl":2}')
    assert got["records"][0]["radio"] == {"rsrp_dbm": -110.0, "sinr_db": -3.0, "rsrq_db": None, "ecl": 2,
                                          "pci": 12, "cell_id": None}


leaf_names = st.text("abcdefgh", min_size=1, max_size=6)
leaves = st.none() | st.booleans() | st.text(max_size=10) | st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=80, deadline=None)
@given(fields=st.dictionaries(st.lists(leaf_names, min_size=1, max_size=3).map(".".join), leaves, max_size=6))
def test_round_trip_through_name_map(fields):
    # Paths where one is a prefix of another cannot both be leaves; keep the generated set consistent.
    paths = sorted(fields)
    if any(b.startswith(a + ".") for a in paths for b in paths):
        return
    name_map = {path: f"r_{i}" for i, path in enumerate(paths)}
    got = decode("json", encode("json", fields), {"name_map": name_map})["fields"]
    assert got == {name_map[p]: (float(v) if isinstance(v, float) else v) for p, v in fields.items()}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["ts", "a", "b", "rsrp"]),
                                                                      children, max_size=5), max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       time_field=st.none() | st.sampled_from(["ts", "a.b"]),
       name_map=st.sampled_from([{}, {"a": "x", "b.ts": "y", "a.0": "z"}]))
def test_only_decode_errors_escape(data, time_field, name_map):
    try:
        decode("json", data, {"time_field": time_field, "name_map": name_map})
    except DecodeError:
        pass


@settings(max_examples=40, deadline=None)
@given(frames=st.lists(st.binary(max_size=60), max_size=8))
def test_batch_never_raises(frames):
    assert len(decode_batch("json", frames)) == len(frames)
