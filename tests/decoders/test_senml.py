"""SenML JSON and CBOR: the RFC 8428 examples with the RFC's resolved values, LwM2M object 3424 mapping,
malformed packs, encode -> decode round trips, and that nothing but DecodeError escapes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from hypothesis import given, settings, strategies as st

from tests.decoders.golden import CASES, load_cases, plain
from decoders import DecodeError, decode, decode_batch, encode

@pytest.mark.parametrize("codec", ["senml-json", "senml-cbor"])
def test_golden(codec):
    cases = list(load_cases(codec))
    assert cases
    for case in cases:
        payload, meta = case.values
        assert meta["source"]
        if "reason" in meta:
            with pytest.raises(DecodeError) as err:
                decode(codec, payload, meta.get("settings"))
            assert err.value.reason == meta["reason"], (case.id, err.value)
            assert decode_batch(codec, [payload], meta.get("settings")).reason(0) == meta["reason"]
            continue
        result = decode(codec, payload, meta.get("settings"))
        for key, want in meta["expected"].items():
            assert plain(result[key]) == want, (case.id, key)


def test_cbor_dump_equals_json_pack():
    """RFC 8428 §6 says its CBOR dump is the same measurement as the §5.1.2 JSON pack."""
    cbor_case = (CASES / "senml-cbor" / "rfc8428_6_dump.hex").read_text().strip()
    json_case = (CASES / "senml-json" / "rfc8428_5_1_2_base_time.txt").read_bytes()
    assert decode("senml-cbor", bytes.fromhex(cbor_case)) == decode("senml-json", json_case)


def test_relative_time_uses_settings_now_and_base_value_sum():
    pack = b'[{"bn":"dev:","bv":10,"bs":100,"bt":-60,"n":"a","v":1.5,"s":2},{"n":"b","t":30}]'
    records = decode("senml-json", pack, {"now": 1_700_000_000})["records"]
    base = datetime.fromtimestamp(1_700_000_000, UTC)
    assert records[0]["value"] == 11.5 and records[0]["sum"] == 102.0
    assert records[0]["time"] == base - timedelta(seconds=60)
    assert records[1]["value"] == 10.0 and records[1]["sum"] == 100.0        # bases carry over
    assert records[1]["time"] == base - timedelta(seconds=30)


def test_sum_only_record_and_update_time():
    rec = decode("senml-json", b'[{"n":"meter","u":"m3","s":12.5,"ut":3600,"t":1767225600}]')["records"][0]
    assert rec["value"] is None and rec["sum"] == 12.5 and rec["update_time"] == 3600.0


def test_unknown_label_without_underscore_is_ignored():
    rec = decode("senml-json", b'[{"n":"x","v":1,"t":1767225600,"foo":2}]')["records"][0]
    assert rec["value"] == 1.0


def test_name_map_matches_path_tail():
    pack = b'[{"bn":"urn:imei:861050042339310/3424/0/","n":"1","v":5,"t":1767225600}]'
    assert decode("senml-json", pack, {"name_map": {"3424/0/1": "flow_m3"}})["fields"] == {"flow_m3": 5.0}


names = st.text("abcdefghijklmnopqrstuvwxyz0123456789:/-._", min_size=1, max_size=20).filter(lambda s: s[0].isalnum())
micros = st.integers(2**28 * 10**6, 4_000_000_000 * 10**6)
records = st.fixed_dictionaries({
    "name": names, "unit": st.none() | st.sampled_from(["m3", "Cel", "%RH", "V", "/"]),
    "time": micros.map(lambda us: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)),
    "sum": st.none() | st.floats(-1e12, 1e12), "update_time": st.none() | st.floats(0, 1e6),
}).flatmap(lambda base: st.sampled_from(["value", "string_value", "bool_value", "data_value"]).flatmap(
    lambda kind: {"value": st.floats(-1e15, 1e15), "string_value": st.text(max_size=20),
                  "bool_value": st.booleans(), "data_value": st.binary(max_size=20)}[kind].map(
        lambda v: {**base, "value": None, "string_value": None, "bool_value": None, "data_value": None, kind: v})))


@pytest.mark.parametrize("codec", ["senml-json", "senml-cbor"])
@settings(max_examples=80, deadline=None)
@given(pack=st.lists(records, min_size=1, max_size=6))
def test_round_trip(codec, pack):
    assert decode(codec, encode(codec, {"records": pack}))["records"] == pack


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut", "x_"]),
        children, max_size=6), max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_json_only_decode_errors_escape(data):
    try:
        decode("senml-json", data)
    except DecodeError:
        pass


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.integers(-8, 9) | st.sampled_from(["v", "n", "x_"]), children, max_size=6), max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | cbor_values.map(cbor2.dumps))
def test_cbor_only_decode_errors_escape(data):
    try:
        decode("senml-cbor", data)
    except DecodeError:
        pass


@pytest.mark.parametrize("codec", ["senml-json", "senml-cbor"])
@settings(max_examples=40, deadline=None)
@given(frames=st.lists(st.binary(max_size=60), max_size=8))
def test_batch_never_raises(codec, frames):
    assert len(decode_batch(codec, frames)) == len(frames)
