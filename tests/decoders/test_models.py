"""The device-model catalogue: the bundled TOML loads, refuses bad entries with the file and model named,
imports no codec module, and its envelope models reach their inner codec end to end."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest

from decoders import decode, encode
from decoders.carrier import unwrap
from decoders.models import DeviceModel, get_model, load_models


def test_bundled_catalogue_loads_with_the_seeded_models():
    models = load_models()
    assert {m.family for m in models.values()} == {"water", "fire", "traffic", "parking"}
    assert models["cjt188-nb-water-90-1f"].settings["di_order"] == "high_first"
    msb = models["cjt188-nb-water-msb-status"].settings
    assert (msb["valve_shift"], msb["battery_bit"]) == (6, 5)
    assert models["onenet-cjt188-water"].inner_codec == "cjt188"
    assert models["lwm2m-3424-water-senml-cbor"].name_map["/3424/0/1"] == "flow_m3"
    assert {models[n].codec for n in ("gb26875-uitd", "gbt43229-detector", "nb-parking-sensor")} == {
        "gb26875", "gbt43229", "parking"}
    assert all(isinstance(m, DeviceModel) for m in models.values())


def test_loading_imports_no_codec_module():
    code = ("import sys; from decoders.models import load_models; load_models(); "
            "print(sorted(m for m in sys.modules if m.startswith('decoders.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # decoders.radio: the radio spec check, pure Python (no codec, no numba)
    assert out.strip() == "['decoders.errors', 'decoders.models', 'decoders.radio', 'decoders.registry']"


def write(tmp_path, text, name="extra.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = '[models."m1"]\nvendor = "v"\nfamily = "water"\ncodec = "cjt188"\nnetwork = "nbiot"\nreport_interval_s = 60\n'


@pytest.mark.parametrize(("change", "message"), [
    (('codec = "cjt188"', 'codec = "cjt189"'), "unknown codec 'cjt189'"),
    (('family = "water"', 'family = "gas"'), "family 'gas'"),
    (('network = "nbiot"', 'network = "lora"'), "network 'lora'"),
    (("report_interval_s = 60", "report_interval_s = 0"), "report_interval_s"),
    (('vendor = "v"', 'vendor = "v"\ninner_codec = "json"'), "inner_codec is only for envelope codecs"),
    (('vendor = "v"', 'vendor = "v"\nsetings = {}'), "unknown keys ['setings']"),
    (('vendor = "v"\n', ""), "missing 'vendor'"),
])
def test_invalid_model_names_file_and_model(tmp_path, change, message):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ValueError) as err:
        load_models([path])
    assert "extra.toml" in str(err.value) and "'m1'" in str(err.value) and message in str(err.value)


def test_duplicate_and_broken_toml(tmp_path):
    with pytest.raises(ValueError, match="already defined in a.toml"):
        load_models([write(tmp_path, GOOD, "a.toml"), write(tmp_path, GOOD, "b.toml")])
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        load_models([write(tmp_path, "[models.x\n", "bad.toml")])


def test_adding_a_model_is_data_only(tmp_path):
    text = GOOD.replace('codec = "cjt188"', 'codec = "ctwing"\ninner_codec = "cjt188"') + \
        '[models."m1".inner_settings]\ndi_order = "high_first"\n'
    model = load_models([write(tmp_path, text)])["m1"]
    assert model.inner_codec == "cjt188" and model.inner_settings == {"di_order": "high_first"}


def test_get_model_names_known_ones():
    assert get_model("gb26875-uitd").codec == "gb26875"
    with pytest.raises(KeyError, match="known"):
        get_model("nope")


@pytest.mark.parametrize("name", ["ctwing-cjt188-water", "onenet-cjt188-water"])
def test_envelope_model_end_to_end(name):
    """A meter frame wrapped by the carrier comes out of the model's inner codec with the meter's values."""
    model = get_model(name)
    frame = encode("cjt188", {"meter_address": "78330123456789", "flow_m3": 123.45,
                              "meter_time": datetime(2026, 1, 1, tzinfo=UTC)}, {"di_order": "high_first"})
    body = encode(model.codec, {"inner_payload": frame, "imei": "866971030389733", "device_id": "42",
                                "received_at": datetime(2026, 1, 1, 0, 5, tzinfo=UTC)})
    envelope, inner = unwrap(model.codec, body, model.codec_settings())
    reading = decode(model.inner_codec, inner, dict(model.inner_settings))
    assert envelope["imei"] == "866971030389733" and envelope["received_at"] == datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
    assert reading["meter_address"] == "78330123456789" and reading["flow_m3"] == 123.45


def test_senml_model_maps_3424():
    model = get_model("lwm2m-3424-water-senml-cbor")
    pack = encode("senml-cbor", {"records": [{"name": "/3424/0/1", "unit": "m3", "value": 17.25,
                                              "time": datetime(2026, 1, 1, tzinfo=UTC)}]})
    assert decode(model.codec, pack, model.codec_settings())["fields"] == {"flow_m3": 17.25}


@pytest.mark.parametrize(("value", "ok"), [("512", True), ("65536", True), ("0", False), ("65537", False),
                                           ("true", False), ('"4k"', False), ("1.5", False)])
def test_max_payload_bytes_is_a_byte_count_up_to_the_gateway_ceiling(tmp_path, value, ok):
    path = write(tmp_path, GOOD + f"max_payload_bytes = {value}\n")
    if ok:
        assert load_models([path])["m1"].max_payload_bytes == int(value)
    else:
        with pytest.raises(ValueError, match="max_payload_bytes must be an integer from 1 to 65536"):
            load_models([path])
    assert load_models([write(tmp_path, GOOD, "plain.toml")])["m1"].max_payload_bytes == 16384   # the default


def test_every_bundled_model_fits_its_protocols_largest_frame_and_the_gateway_ceiling():
    """A limit below a valid frame would reject real readings: each is at least the largest frame its
    codec can carry (CJ/T 188: 13 + a one-byte L, with a preamble; GB/T 26875.3: 30 + 1,024)."""
    from iotjx.settings import Settings

    largest = {"cjt188": 4 + 13 + 255, "gb26875": 30 + 1024, "parking": 13}
    for m in load_models().values():
        inner = m.inner_codec or m.codec
        assert largest.get(inner, 0) <= m.max_payload_bytes <= Settings().uplink_max_bytes, m.name
