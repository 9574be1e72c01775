"""Carrier envelopes (ctwing, onenet): golden pushes from public sources, malformed variants, radio rules,
round trips, and that no input escapes as anything but DecodeError."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings, strategies as st

from tests.decoders.golden import load_cases, plain
from decoders import DecodeError, decode, decode_batch, encode
from decoders.carrier import radio_fields, unwrap

def check_case(codec: str, payload: bytes, meta: dict) -> None:
    assert meta["source"]
    settings_ = meta.get("settings")
    if "reason" in meta:
        with pytest.raises(DecodeError) as err:
            decode(codec, payload, settings_)
        assert err.value.reason == meta["reason"], err.value
        batch = decode_batch(codec, [payload], settings_)
        assert batch.reason(0) == meta["reason"]
        return
    result = decode(codec, payload, settings_)
    for key, want in meta["expected"].items():
        if key == "inner_payload_json":
            assert json.loads(result["inner_payload"]) == want
        else:
            assert plain(result[key]) == want, key
    batch = decode_batch(codec, [payload], settings_)
    assert batch.reason(0) is None and batch.record(0) == result


@pytest.mark.parametrize(("payload", "meta"), list(load_cases("ctwing")))
def test_ctwing_golden(payload, meta):
    check_case("ctwing", payload, meta)


@pytest.mark.parametrize(("payload", "meta"), list(load_cases("onenet")))
def test_onenet_golden(payload, meta):
    check_case("onenet", payload, meta)


def test_golden_sets_are_not_trivially_small():
    for codec in ("ctwing", "onenet"):
        cases = list(load_cases(codec))
        assert sum("expected" in c.values[1] for c in cases) >= 5
        assert sum("reason" in c.values[1] for c in cases) >= 5


@pytest.mark.parametrize(("raw", "want"), [
    ({"RSRP": 114}, -114.0), ({"rsrp": -95}, -95.0), ({"Signal_RSRP": "-101"}, -101.0),
    ({"rsrp": 0}, None), ({"rsrp": 170}, None), ({"rsrp": "n/a"}, None), ({"rsrp": True}, None),
])
def test_rsrp_sign_and_range(raw, want):
    assert radio_fields([raw], {})["rsrp_dbm"] == want


def test_sinr_rsrq_tenths_rule():
    auto = radio_fields([{"sinr": 125, "rsrq": -105}], {"radio_tenths": "auto"})
    assert auto["sinr_db"] == 12.5 and auto["rsrq_db"] == -10.5
    assert radio_fields([{"sinr": 12}], {"radio_tenths": "auto"})["sinr_db"] == 12.0
    assert radio_fields([{"sinr": 12}], {"radio_tenths": "always"})["sinr_db"] == 1.2
    assert radio_fields([{"sinr": 125}], {"radio_tenths": "never"})["sinr_db"] is None   # out of range


def test_radio_found_in_nested_dicts_and_ranges_enforced():
    radio = radio_fields([{"signal": {"ECL": 1, "PCI": 503, "cellId": "A1B2C3"}}], {})
    assert radio["ecl"] == 1 and radio["pci"] == 503 and radio["cell_id"] == 0xA1B2C3
    bad = radio_fields([{"ecl": 3, "pci": 504, "cell_id": 1 << 28}], {})
    assert bad["ecl"] is None and bad["pci"] is None and bad["cell_id"] is None


def test_onenet_object4_datastream_is_radio():
    body = b'{"msg":{"at":1553224758882,"imei":"866971030389733","type":1,"ds_id":"4_0_2","value":-97,"dev_id":1}}'
    assert decode("onenet", body)["radio"]["rsrp_dbm"] == -97.0


def test_unwrap_hands_over_inner_bytes():
    body = encode("onenet", {"inner_payload": b"\x68\x10\x16", "imei": "866971030389733", "device_id": 7,
                             "received_at": datetime(2026, 1, 1, tzinfo=UTC)})
    envelope, inner = unwrap("onenet", body, {"value_encoding": "hex"})
    assert inner == b"\x68\x10\x16" and envelope["device_id"] == "7"
    with pytest.raises(ValueError):
        unwrap("cjt188", body)


ids = st.text("0123456789", min_size=1, max_size=15)


@settings(max_examples=60, deadline=None)
@given(inner=st.binary(min_size=1, max_size=300), imei=ids, sequence=st.integers(0, 2**31),
       ms=st.integers(0, 4102444800000))
def test_ctwing_round_trip(inner, imei, sequence, ms):
    when = datetime.fromtimestamp(ms / 1000, UTC)
    body = encode("ctwing", {"inner_payload": inner, "imei": imei, "sequence": sequence, "received_at": when,
                             "device_id": "d1"})
    got = decode("ctwing", body)
    assert (got["inner_payload"], got["imei"], got["sequence"], got["received_at"]) == (inner, imei, sequence, when)


@settings(max_examples=60, deadline=None)
@given(inner=st.binary(min_size=1, max_size=300), dev_id=st.integers(0, 2**40))
def test_onenet_round_trip(inner, dev_id):
    got = decode("onenet", encode("onenet", {"inner_payload": inner, "device_id": dev_id, "imei": "1"}))
    assert got["inner_payload"] == inner and got["device_id"] == str(dev_id)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25)
envelope_like = st.fixed_dictionaries({}, optional={
    "messageType": st.sampled_from(["dataReport", "deviceOnlineOfflineReport", "eventReport", "x"]) | json_values,
    "payload": json_values | st.dictionaries(st.sampled_from(["APPdata", "serviceData", "serviceId", "rsrp"]),
                                             json_values),
    "timestamp": json_values, "eventType": json_values, "IMEI": json_values, "upPacketSN": json_values,
    "notifyType": st.sampled_from(["deviceDataChanged"]) | json_values, "service": json_values,
    "msg": json_values | st.dictionaries(st.sampled_from(["type", "at", "value", "ds_id", "status", "imei", "dev_id"]),
                                         json_values),
    "enc_msg": json_values,
})


@pytest.mark.parametrize("codec", ["ctwing", "onenet"])
@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200) | envelope_like.map(lambda d: json.dumps(d).encode()))
def test_only_decode_errors_escape(codec, data):
    try:
        decode(codec, data)
    except DecodeError:
        pass


@pytest.mark.parametrize("codec", ["ctwing", "onenet"])
@settings(max_examples=60, deadline=None)
@given(frames=st.lists(st.binary(max_size=80) | envelope_like.map(lambda d: json.dumps(d).encode()), max_size=8))
def test_batch_never_raises(codec, frames):
    batch = decode_batch(codec, frames)
    assert len(batch) == len(frames)
