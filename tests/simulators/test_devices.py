"""The device models and the NB-IoT behaviour, read back through the reference decoders: what the
frames say (not what the simulator meant) must show the curves, leaks, roll-overs, batteries,
replacements, alarms, rush hours, occupancy, midnight burst, clock drift and radio figures."""

from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from simulators.engine import CLOCK_SET_WITHIN_S, simulate
from simulators.nbiot import ECL_THRESHOLDS_DBM, local_hour
from simulators.scenario import parse_scenario
from tests.simulators.reference import binomial_ok, decode

CHINA = timedelta(hours=8)


def _run(fleets, *, start="2026-07-06T00:00:00+08:00", duration="1d", seed=1, **behaviour):
    doc = {"scenario": {"name": "t", "start": start, "duration": duration, "seed": seed},
           "behaviour": behaviour, "fleet": fleets}
    return simulate(parse_scenario(doc))


def _by_device(records):
    out = defaultdict(list)
    for r in records:
        if "duplicate" not in r.labels and "corrupt" not in r.labels:
            out[r.device_id].append(r)
    for recs in out.values():
        recs.sort(key=lambda r: r.sent_t)
    return out


def _local_hour(when: datetime) -> int:
    return (when + CHINA).hour


# --------------------------------------------------------------------------- water

def test_water_meters_register_curves_leaks_rollover_battery_replacement():
    sim, records = _run([
        {"model": "cjt188-nb-water-90-1f", "count": 60, "interval_s": 3600, "households": {"shop": 1},
         "leak": 0.5, "leak_m3h": [0.02, 0.05], "transport": "mqtt"},
        {"model": "cjt188-nb-water-std", "count": 80, "interval_s": 3600, "households": {"family": 1},
         "rollover": 0.3, "battery_low": 0.3, "replacement": 0.3, "valve_closed": 0.1},
        {"model": "cjt188-nb-water-msb-status", "count": 40, "interval_s": 3600, "battery_low": 0.5},
    ], duration="2d", clock_offset_s=0, clock_drift_ppm=0)
    seen = defaultdict(int)
    night_flow = {}
    for device_id, recs in _by_device(records).items():
        decoded = [decode(r) for r in recs]
        assert all(d.reason is None for d in decoded)
        prev = None
        for d in decoded:
            f, labels = d.fields, d.record.labels
            # Clocks without error: the meter's time is the second it sent at.
            assert -1.001 < f["meter_time"].timestamp() - d.record.sent_t <= 0.001
            assert f["battery_low"] == ("battery_low" in labels), (d.record.model, f["status"], labels)
            assert (f["valve"] == "closed") == ("valve_closed" in labels)
            if prev is not None:
                if "replacement" in labels:
                    assert f["meter_address"] != prev["meter_address"] and f["flow_m3"] < 5
                elif "rollover" in labels:
                    assert prev["flow_m3"] > 999_000 and f["flow_m3"] < prev["flow_m3"]
                else:
                    assert f["meter_address"] == prev["meter_address"] and f["flow_m3"] >= prev["flow_m3"]
            for label in labels:
                seen[label] += 1
            prev = f
        # Night flow: the register's rise from 01:00 to 05:00 local on the first night.
        at = {(d.record.sent_t - sim.scenario.start) // 3600: d.fields["flow_m3"] for d in decoded}
        if 1 in at and 5 in at and recs[0].model == "cjt188-nb-water-90-1f":
            night_flow[device_id] = (at[5] - at[1], "leak" in recs[0].labels)
    assert seen["rollover"] > 0 and seen["replacement"] > 0 and seen["battery_low"] > 0 and seen["valve_closed"] > 0
    leaking = [flow for flow, leak in night_flow.values() if leak]
    dry = [flow for flow, leak in night_flow.values() if not leak]
    assert len(leaking) > 15 and len(dry) > 15
    assert min(leaking) >= 4 * 0.02 - 0.011            # a leak of ≥ 20 L/h runs all night
    assert max(dry) < 0.03                              # a closed shop uses next to nothing at night


def test_household_curve_peaks_morning_and_evening():
    _, records = _run([{"model": "cjt188-nb-water-std", "count": 40, "interval_s": 3600,
                        "households": {"family": 1}, "transport": "mqtt"}],
                      clock_offset_s=0, clock_drift_ppm=0, wake_jitter_s=0)
    use = defaultdict(float)
    for recs in _by_device(records).values():
        flows = [(decode(r).fields["flow_m3"], r.sent_t) for r in recs]
        for (a, _), (b, t) in zip(flows, flows[1:]):
            use[local_hour(t - 1)] += b - a
    peaks = sum(use[h] for h in (6, 7, 18, 19))
    night = sum(use[h] for h in (1, 2, 3, 4))
    assert peaks > 8 * night


# --------------------------------------------------------------------------- fire

def test_fire_panels_smoke_detectors_hydrants_as_decoded():
    sim, records = _run([
        {"model": "gb26875-uitd", "count": 6, "alarm_per_day": 4, "fault_per_day": 3, "detectors": [5, 10]},
        {"model": "gb26875-nb-smoke", "count": 60, "alarm_per_day": 0.3, "battery_low": 0.2},
        {"model": "gb26875-uitd", "kind": "hydrant", "count": 6, "interval_s": 900, "low_pressure_per_day": 2,
         "site_kind": "hydrant"},
        {"model": "ctwing-lian-smoke", "count": 10, "alarm_per_day": 1},
    ])
    kinds = defaultdict(int)
    for r in records:
        if "corrupt" in r.labels:
            continue
        d = decode(r)
        assert d.reason is None, (r, d.reason)
        if d.fields is None:                                # the profile detector: carrier-decoded JSON
            data = d.envelope["service_data"]
            assert data["Alarm_Status"] == ("alarm" in r.labels or ("restore" not in r.labels and data["Alarm_Status"]))
            assert d.envelope["radio"]["rsrp_dbm"] == -round(-r.radio["rsrp_dbm"])   # sent as a magnitude
            assert d.envelope["radio"]["ecl"] == r.radio["ecl"]
            kinds["profile"] += 1
            continue
        f = d.fields
        objs = f["objects"]
        if "alarm" in r.labels:
            assert f["app_type"] == 2 and objs[0]["flags"]["fire_alarm"]
            kinds["alarm"] += 1
        elif "restore" in r.labels:
            assert f["app_type"] == 2 and not objs[0]["flags"]["fire_alarm"]
        elif "fault" in r.labels:
            assert f["app_type"] == 2 and objs[0]["flags"]["fault"]
            kinds["fault"] += 1
        elif "fault_restore" in r.labels:
            assert f["app_type"] == 2 and not objs[0]["flags"]["fault"]
        if r.model == "gb26875-uitd" and f["app_type"] == 21:
            kinds["heartbeat"] += 1
        if f["app_type"] == 3 and objs[0]["system_type"] == 11:
            pressure = objs[0]["value"]
            assert objs[0]["unit"] == "kPa"
            assert (pressure < 100) == ("low_pressure" in r.labels)
            kinds["pressure"] += 1
        if r.model == "gb26875-nb-smoke":
            assert all(o.get("description") is None for o in objs)        # the short NB objects
            vendor = {o["analog_type"]: o["raw"] for o in objs if f["app_type"] == 3}
            if vendor:
                assert vendor[0x80] == round(r.radio["rsrp_dbm"])         # RSRP in the vendor's type 0x80
        if f["app_type"] == 2 and r.model == "gb26875-uitd" and objs[0]["system_type"] == 1:
            assert objs[0]["description"].endswith("烟感")                 # where the detector is
    assert kinds["alarm"] >= 5 and kinds["fault"] >= 5 and kinds["heartbeat"] >= 6 * 250
    assert kinds["pressure"] >= 6 * 90 and kinds["profile"] >= 10


# --------------------------------------------------------------------------- traffic

def test_lane_detectors_rush_hours_occupancy_and_speed():
    _, records = _run([{"model": "gbt43229-detector", "count": 6, "city": "Nanchang", "interval_s": 300},
                       {"model": "gbt43229-detector-be", "count": 2, "city": "Nanchang", "interval_s": 300}])
    volume = defaultdict(int)
    speeds = defaultdict(list)
    pairs = []
    for r in records:
        if "corrupt" in r.labels or "duplicate" in r.labels:
            continue
        f = decode(r).fields
        assert f["division_code"] == 360100
        hour = local_hour(r.sent_t)
        for lane in f["lanes"]:
            n = lane["count_a"] + lane["count_b"] + lane["count_c"]
            volume[hour] += n
            if n:
                speeds[hour].append(lane["speed_kmh"])
                pairs.append((n, lane["occupancy_pct"]))
    rush = sum(volume[h] for h in (7, 8, 17, 18))
    night = sum(volume[h] for h in (1, 2, 3, 4))
    assert rush > 10 * night
    assert statistics.mean(speeds[8]) < statistics.mean(speeds[3] or speeds[4]) - 5
    busy = [occ for n, occ in pairs if n >= 20]
    quiet = [occ for n, occ in pairs if n <= 3]
    assert statistics.mean(busy) > 3 * statistics.mean(quiet)


@pytest.mark.parametrize("start, scenic_busy", [("2026-07-11T00:00:00+08:00", True),     # a summer Saturday
                                                ("2026-03-11T00:00:00+08:00", False)])   # a March Wednesday
def test_parking_occupancy_by_hour_weekday_and_season(start, scenic_busy):
    sim, records = _run([{"model": "nb-parking-sensor", "count": 60, "site_kind": "parking_lot", "city": "Yingtan"},
                         {"model": "nb-parking-sensor", "count": 60, "site_kind": "scenic_spot", "city": "Yingtan",
                          "site_names": ["龙虎山"]}], start=start)
    fleet_of = {p.record.device_id: p.fleet for p in sim.planned}
    states = defaultdict(list)                  # (fleet, local hour) -> occupied as the frames say
    for r in records:
        if "corrupt" in r.labels or "duplicate" in r.labels:
            continue
        f = decode(r).fields
        if "arrival" in r.labels:
            assert f["frame_kind"] == "info" and f["occupied"]
        if "departure" in r.labels:
            assert f["frame_kind"] == "info" and not f["occupied"]
        states[(fleet_of[r.device_id], local_hour(r.sent_t))].append(f["occupied"])

    def share(fleet: int, hours: range) -> float:
        return statistics.mean(v for h in hours for v in states[(fleet, h)])

    lots, spots = 0, 1
    assert share(lots, range(10, 16)) > share(lots, range(1, 5)) + 0.2
    assert (share(spots, range(10, 16)) > 0.6) == scenic_busy
    assert share(spots, range(1, 5)) < 0.2


# --------------------------------------------------------------------------- NB-IoT behaviour

def test_midnight_burst_jitter_clock_drift_and_radio():
    sim, records = _run([{"model": "cjt188-nb-water-std", "count": 400, "coverage": {"good": 1, "fair": 1,
                                                                                     "poor": 1, "deep": 1}}],
                        duration="3d", midnight_share=0.4, midnight_spread_s=300, wake_jitter_s=300,
                        clock_offset_s=30, clock_drift_ppm=40)
    by_device = _by_device(records)
    in_burst = 0
    for recs in by_device.values():
        local = datetime.fromtimestamp(recs[0].sent_t, UTC) + CHINA
        in_burst += local.hour == 0 and local.minute < 11         # spread 5 min + back-off 5 min + clock
    # Devices outside the burst wake uniformly over the day: 11 of 1440 minutes fall in the window.
    assert binomial_ok(in_burst, len(by_device), 0.4 + 0.6 * 11 / 1440)
    # Daily slots keep their time of day: successive wake-ups differ by a day ± the back-off.
    gaps = [b.sent_t - a.sent_t for recs in by_device.values() for a, b in zip(recs, recs[1:])]
    assert all(86400 - 301 <= g <= 86400 + 301 for g in gaps)
    # Device clocks: the meter's time minus the true send time has the configured spread, not zero.
    errors = [decode(r).fields["meter_time"].timestamp() - r.sent_t for recs in by_device.values() for r in recs]
    # Expected: offset sd 30 s, and 40 ppm of drift since a setting up to 90 days ago (uniform: rms age 90 d/√3).
    expected = (30 ** 2 + (40e-6 * CLOCK_SET_WITHIN_S / 3 ** 0.5) ** 2) ** 0.5
    assert 0.7 * expected < statistics.pstdev(errors) < 1.3 * expected
    # Radio: ECL follows RSRP; coverage classes order the mean RSRP.
    coverage = {p.record.device_id: p.coverage for p in sim.planned}
    rsrp = defaultdict(list)
    for r in records:
        assert r.radio["ecl"] == (0 if r.radio["rsrp_dbm"] >= ECL_THRESHOLDS_DBM[0]
                                  else 1 if r.radio["rsrp_dbm"] >= ECL_THRESHOLDS_DBM[1] else 2)
        assert -140 <= r.radio["rsrp_dbm"] <= -44 and -10 <= r.radio["sinr_db"] <= 30
        rsrp[coverage[r.device_id]].append(r.radio["rsrp_dbm"])
    means = [statistics.mean(rsrp[c]) for c in ("good", "fair", "poor", "deep")]
    assert means == sorted(means, reverse=True) and means[0] - means[-1] > 25


def test_lwm2m_meters_report_object_4_as_the_radio_spec_reads_it():
    """An LwM2M meter's SenML carries its register (3424/0/1) and connectivity monitoring (object 4):
    through its model's radio declaration the figures are the module's fix (RSRP and SINR to the dB,
    the OMA CE level back to the ECL)."""
    from decoders.models import get_model
    from decoders.radio import declared, normalised

    sim, records = _run([{"model": "lwm2m-3424-water-senml-json", "count": 20, "interval_s": 3600,
                          "coverage": {"good": 1, "deep": 1}},
                         {"model": "lwm2m-3424-water-senml-cbor", "count": 20, "interval_s": 3600}])
    assert records
    registers = defaultdict(list)
    for r in records:
        if "corrupt" in r.labels:
            continue
        d = decode(r)
        assert d.reason is None
        model = get_model(r.model)
        radio = normalised(declared(model.codec, d.fields, model.radio))
        assert radio["rsrp_dbm"] == round(r.radio["rsrp_dbm"]) and radio["sinr_db"] == round(r.radio["sinr_db"])
        assert (radio["ecl"], radio["cell_id"]) == (r.radio["ecl"], r.radio["cell_id"])
        registers[r.device_id].append((r.sent_t, d.fields["fields"]["flow_m3"]))
    for values in registers.values():                  # the register never runs backwards
        flows = [f for _, f in sorted(values)]
        assert flows == sorted(flows)


def test_network_behaviours_as_seen_in_the_capture():
    _, records = _run([{"model": "nb-parking-sensor", "count": 40},
                       {"model": "gbt43229-detector", "count": 4, "interval_s": 300},
                       {"model": "cjt188-nb-water-std", "count": 100, "interval_s": 3600},
                       {"model": "gb26875-uitd", "count": 3},
                       {"model": "onenet-cjt188-water", "count": 20, "interval_s": 3600}],
                      duplicate=0.05, late=0.05, corrupt=0.05, late_delay_s=[900, 3600])
    first_seen = {}
    out_of_order = 0
    for r in records:
        assert r.t >= r.sent_t
        if "late" in r.labels:
            assert r.t - r.sent_t >= 900
        key = (r.device_id, r.payload)
        if "duplicate" in r.labels:
            assert key in first_seen and first_seen[key] <= r.t            # the same bytes, again, later
        else:
            first_seen.setdefault(key, r.t)
        d = decode(r)
        if "corrupt" in r.labels:
            assert d.reason in ("checksum", "length", "truncated"), (r.model, d.reason)
        else:
            assert d.reason is None, (r.model, d.reason)
    last_sent = {}
    for r in records:                                                       # arrival order
        if "duplicate" not in r.labels:
            out_of_order += r.sent_t < last_sent.get(r.device_id, 0)
            last_sent[r.device_id] = max(r.sent_t, last_sent.get(r.device_id, 0))
    assert out_of_order > 10                                                # store-and-forward overtakes
