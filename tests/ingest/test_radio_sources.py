"""Every source of radio figures lands in radio_readings, normalised (dBm, dB, ECL 0–2, PCI, cell id):
real frames through the real pipeline into the real database, compared with the figures worked out by
hand from each frame (docs/radio.md)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

import decoders
from decoders.gb26875_layout import ANALOG_VALUE
from decoders.models import load_models
from decoders.radio import declared, normalised, spec_problem
from iotjx.devices import DeviceRecord, register_devices
from iotjx.model import Uplink
from tests.helpers import store_uplinks

NOW = datetime.now(UTC).replace(microsecond=0)
SMOKE, PANEL = "869100000000001", "869100000000002"
SENML_JSON, SENML_CBOR, SENML_WILD = "869100000000003", "869100000000004", "869100000000005"
LIAN, ONENET_METER, JSON_PARKING = "869100000000006", "869100000000007", "869100000000008"
CJT188 = "869100000000009"


def _process(db_url: str, uplinks: list[Uplink]) -> dict[str, int]:
    return store_uplinks(db_url, uplinks)


def _up(device: str, payload: bytes, minutes_ago: int, transport: str = "coap", **meta) -> Uplink:
    return Uplink(device_id=device, payload=payload, transport=transport,
                  received_at=(NOW - timedelta(minutes=minutes_ago)).timestamp(), meta=meta)


def _analog(source: int, values: list[tuple[int, int]]) -> bytes:
    objects = [{"system_type": 1, "system_address": 0, "component_type": 0x28, "component_address": 4242,
                "time": NOW, "analog_type": kind, "raw": raw} for kind, raw in values]
    return decoders.encode("gb26875", {"serial": 7, "version": "2.255", "sent_at": NOW, "source_address": source,
                                       "command": 2, "app_type": ANALOG_VALUE, "objects": objects,
                                       "with_description": False})


def _senml(records: list[tuple[str, float]]) -> dict:
    return {"records": [{"name": f"urn:imei:{SENML_JSON}{name}", "value": value, "time": NOW}
                        for name, value in records]}


OBJECT4 = [("/3424/0/1", 12.5), ("/4/0/2", -112.0), ("/4/0/3", -11.0), ("/4/0/8", 0x1A2B3C4), ("/4/0/11", 4.0),
           ("/4/0/13", 2.0)]
LIAN_DATA = {"Alarm_Status": 0, "Battery_Level": 80, "RSRP": 114, "SNR": 5, "ECL": 1, "PCI": 12, "Cell_ID": 123456}


def _ctwing(imei: str, service: dict) -> bytes:
    return decoders.encode("ctwing", {"imei": imei, "device_id": "d" * 32, "received_at": NOW, "sequence": 3,
                                      "service_data": service})


def _onenet(imei: str, ds_id: str, value) -> bytes:
    msg = {"at": int(NOW.timestamp() * 1000), "imei": imei, "type": 1, "ds_id": ds_id, "value": value, "dev_id": 77}
    return json.dumps({"msg": msg, "msg_signature": "", "nonce": "abc"}).encode()


@pytest.fixture
def stored(db_url):
    models = {SMOKE: "gb26875-nb-smoke", PANEL: "gb26875-uitd", SENML_JSON: "lwm2m-3424-water-senml-json",
              SENML_CBOR: "lwm2m-3424-water-senml-cbor", SENML_WILD: "lwm2m-3424-water-senml-json",
              LIAN: "ctwing-lian-smoke", ONENET_METER: "onenet-cjt188-water", JSON_PARKING: "cat1-json-parking",
              CJT188: "cjt188-nb-water-std"}
    with psycopg.connect(db_url) as conn:
        register_devices(conn, [DeviceRecord(device_id=d, model=m, city="Yingtan", site_kind="residential",
                                             site_name="无线小区", installed_at=NOW - timedelta(days=1))
                                for d, m in models.items()])
    meter = decoders.encode("cjt188", {"meter_address": CJT188[-14:], "flow_m3": 1.25, "meter_time": NOW})
    uplinks = [
        _up(SMOKE, _analog(7, [(0x80, -95), (0x88, 3575)]), 10),               # F9164-TD-NB: 0x80 is RSRP dBm
        _up(PANEL, _analog(8, [(0x80, -95)]), 10),                             # a panel's 0x80: not declared
        _up(SENML_JSON, decoders.encode("senml-json", _senml(OBJECT4)), 9),
        _up(SENML_CBOR, decoders.encode("senml-cbor", _senml(OBJECT4[:3])), 9),
        _up(SENML_WILD, decoders.encode("senml-json", _senml([("/4/0/2", -20.0), ("/4/0/13", 4.0)])), 9),
        _up(LIAN, _ctwing(LIAN, LIAN_DATA), 8, transport="http"),
        _up("", _onenet(ONENET_METER, "4_0_2", -101), 7, transport="http", envelope="onenet"),
        _up("", _onenet(ONENET_METER, "4_0_13", 3), 6, transport="http", envelope="onenet"),
        _up(JSON_PARKING, json.dumps({"status": 1, "battery": 80, "time": int(NOW.timestamp()), "rsrp": -90,
                                      "sinr": 12, "pci": 301}).encode(), 5, transport="mqtt"),
        _up(CJT188, meter, 4),
    ]
    counters = _process(db_url, uplinks)
    assert counters["rejected"] == 0, counters
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


def _radio(conn) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for row in conn.execute("""SELECT device_id, source, rsrp_dbm, sinr_db, rsrq_db, ecl, pci, cell_id
                               FROM radio_readings ORDER BY time"""):
        out.setdefault(row[0], []).append(row[1:])
    return out


def test_every_source_lands_normalised(stored):
    radio = _radio(stored)
    #                      source, rsrp, sinr, rsrq, ecl, pci, cell
    assert radio[SMOKE] == [("gb26875", -95.0, None, None, None, None, None)]
    assert radio[SENML_JSON] == [("senml-json", -112.0, 4.0, -11.0, 1, None, 0x1A2B3C4)]   # CE level 1 = ECL 1
    assert radio[SENML_CBOR] == [("senml-cbor", -112.0, None, -11.0, None, None, None)]
    assert radio[LIAN] == [("ctwing", -114.0, 5.0, None, 1, 12, 123456)]                   # RSRP 114 negated
    assert radio[ONENET_METER] == [("onenet", -101.0, None, None, None, None, None),
                                   ("onenet", None, None, None, 2, None, None)]            # 4_0_13 = 3: ECL 2
    assert radio[JSON_PARKING] == [("json", -90.0, 12.0, None, None, 301, None)]


def test_no_radio_where_none_is_carried_or_declared(stored):
    radio = _radio(stored)
    assert PANEL not in radio            # analog 0x80 is RSRP only for the model that declares it
    assert CJT188 not in radio           # the CJ/T 188 standard frame has no radio
    assert SENML_WILD not in radio       # -20 dBm and CE level 3 are out of range: no figure, no row
    # the readings themselves are stored as before
    assert stored.execute("SELECT count(*) FROM water_readings WHERE device_id = %s", (CJT188,)).fetchone()[0] == 1
    assert stored.execute("SELECT count(*) FROM fire_events WHERE device_id = %s AND analog_type = 136",
                          (SMOKE,)).fetchone()[0] == 1


def test_object4_pushes_are_signal_reports_not_meter_readings(stored):
    rows = stored.execute("SELECT count(*) FROM water_readings WHERE device_id = %s", (ONENET_METER,)).fetchone()[0]
    assert rows == 0
    outcomes = stored.execute("SELECT outcome FROM raw_uplinks WHERE device_id = %s", (ONENET_METER,)).fetchall()
    assert sorted(o for (o,) in outcomes) == ["event:radio", "event:radio"]


def test_the_radio_row_is_the_readings_time(stored):
    got = dict(stored.execute("SELECT device_id, time FROM radio_readings").fetchall())
    readings = dict(stored.execute("SELECT device_id, time FROM water_readings WHERE device_id = %s",
                                   (SENML_JSON,)).fetchall())
    assert got[SENML_JSON] == readings[SENML_JSON] == NOW - timedelta(minutes=9)


# --------------------------------------------------------------------------- the model declarations

def test_bundled_models_declare_their_radio():
    models = load_models()
    assert dict(models["gb26875-nb-smoke"].radio) == {"rsrp_dbm": {"analog_type": 0x80}}
    assert "radio" not in models["gb26875-uitd"].codec_settings()
    assert models["ctwing-lian-smoke"].radio["rsrp_dbm"] == {"field": "RSRP", "transform": "negate"}
    assert models["lwm2m-3424-water-senml-cbor"].radio["ecl"]["transform"] == "oma_ce_level"


@pytest.mark.parametrize("spec, problem", [
    ({"rssi": {"field": "x"}}, "radio figure 'rssi'"),
    ({"rsrp_dbm": {"field": "a", "analog_type": 1}}, "exactly one"),
    ({"rsrp_dbm": {}}, "exactly one"),
    ({"rsrp_dbm": {"analog_type": 300}}, "0..255"),
    ({"rsrp_dbm": {"field": "a", "transform": "cube"}}, "transform must be one of"),
    ({"rsrp_dbm": {"field": "a", "unit": "dBm"}}, "unknown keys"),
    ("rsrp", "must be a table"),
])
def test_a_bad_radio_declaration_is_refused_with_its_reason(spec, problem, tmp_path):
    assert problem in spec_problem(spec)
    path = tmp_path / "bad.toml"
    path.write_text('[models."x"]\nvendor = "v"\nfamily = "water"\ncodec = "senml-json"\nnetwork = "nbiot"\n'
                    'report_interval_s = 60\n')
    with path.open("a") as f:
        f.write(f"radio = {json.dumps(spec)}\n" if isinstance(spec, str) else
                "[models.\"x\".radio]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in spec.items()))
    with pytest.raises(ValueError, match="bad.toml: model 'x'"):
        load_models([path])


def _toml(table: dict) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + " }"


@pytest.mark.parametrize("transform, raw, figure, want", [
    ("negate", 114, "rsrp_dbm", -114.0), ("negate", -114, "rsrp_dbm", -114.0), ("tenths", 55, "sinr_db", 5.5),
    ("negate_tenths", 105, "rsrq_db", -10.5), ("cesq_rsrp", 30, "rsrp_dbm", -111.0),
    ("cesq_rsrq", 20, "rsrq_db", -10.0), ("oma_ce_level", 0, "ecl", 0), ("oma_ce_level", 1, "ecl", 0),
    ("oma_ce_level", 3, "ecl", 2), ("oma_ce_level", 4, "ecl", None),
])
def test_transforms_then_ranges(transform, raw, figure, want):
    spec = {figure: {"field": "x", "transform": transform}}
    assert normalised(declared("json", {"fields": {"x": raw}}, spec))[figure] == want


@pytest.mark.parametrize("raw, want", [("38848339", 38848339), ("1A2B3C4", 0x1A2B3C4), (12345.0, 12345),
                                       ("zz", None), (1 << 28, None), (12.5, None)])
def test_cell_ids_as_numbers_or_decimal_or_hex_text(raw, want):
    spec = {"cell_id": {"field": "Cell_ID"}}
    assert normalised(declared("fields", {"fields": {"Cell_ID": raw}}, spec))["cell_id"] == want
