"""Scenario files: the bundled ones load and cover what they claim, bad files are refused with a
message naming the key, and a scenario is deterministic given its seed (byte-identical captures)."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from decoders.models import load_models
from iotjx.cli import app
from simulators.scenario import ScenarioError, bundled_scenarios, load_scenario, parse_scenario

runner = CliRunner()


def test_bundled_scenarios_load_and_cover_their_claims():
    assert {"yingtan-water", "nanchang-traffic", "province-mix"} <= set(bundled_scenarios())
    models = load_models()
    for name in bundled_scenarios():
        s = load_scenario(name)
        assert s.device_count > 0 and s.duration_s > 0 and s.speed > 0
        assert all(f.model.name in models for f in s.fleets)
    yingtan = load_scenario("yingtan-water")
    assert {code for f in yingtan.fleets for code, _ in f.cities} == {360600}
    assert {f.family for f in yingtan.fleets} == {"water"}
    traffic = load_scenario("nanchang-traffic")
    assert {f.family for f in traffic.fleets} == {"traffic", "parking"}
    assert {code for f in traffic.fleets for code, _ in f.cities} == {360100}
    mix = load_scenario("province-mix")
    assert {f.family for f in mix.fleets} == {"water", "fire", "traffic", "parking"}
    assert {code for f in mix.fleets for code, _ in f.cities} == {360100, 360200, 360300, 360400, 360500, 360600,
                                                                  360700, 360800, 360900, 361000, 361100}
    assert {t for f in mix.fleets for t, w in f.transports if w} == {"mqtt", "coap", "http"}


def _doc(**fleet):
    return {"scenario": {"name": "x", "start": "2026-07-01T00:00:00+08:00", "duration": "1h"},
            "fleet": [{"model": "cjt188-nb-water-std", "count": 1, **fleet}]}


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown keys ['colour']"),
    ({"model": "no-such-meter"}, "no device model 'no-such-meter'"),
    ({"transport": "http"}, "cannot use http"),
    ({"leak": 1.5}, "leak must be a rate between 0 and 1"),
    ({"city": "Atlantis"}, "unknown city 'Atlantis'"),
    ({"households": {"castle": 1}}, "households"),
    ({"family": "fire"}, "is a water model, not fire"),
    ({"behaviour": {"duplicate": -0.1}}, "duplicate must be a rate"),
    ({"count": -1}, "count must be a non-negative integer"),
])
def test_bad_fleets_are_refused_with_the_key_named(change, message):
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_scenario(_doc(**change))


def test_carrier_models_must_arrive_by_http_push():
    doc = _doc(model="ctwing-cjt188-water", transport="coap")
    with pytest.raises(ScenarioError, match="arrive by HTTP push"):
        parse_scenario(doc)
    assert parse_scenario(_doc(model="ctwing-cjt188-water")).fleets[0].transports == (("http", 1.0),)


def test_durations_and_start_times():
    s = parse_scenario({"scenario": {"name": "x", "start": "2026-07-01T00:00:00", "duration": "36h"},
                        "fleet": [{"model": "gb26875-uitd", "count": 2}]})
    assert s.duration_s == 36 * 3600
    assert s.start == datetime(2026, 6, 30, 16, tzinfo=UTC).timestamp()      # a naive start is China time
    assert s.fleets[0].transports == (("mqtt", 1.0),)  # Cat-1 default
    with pytest.raises(ScenarioError, match="duration"):
        parse_scenario({"scenario": {"name": "x", "start": "2026-07-01T00:00:00", "duration": "soon"},
                        "fleet": [{"model": "gb26875-uitd", "count": 2}]})


def _dry_run(path, seed: int | None = None) -> bytes:
    args = ["simulate", "province-mix", "--scale", "0.03", "--duration", "8h", "--dry-run", "--capture", str(path)]
    if seed is not None:
        args += ["--seed", str(seed)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return path.read_bytes()


def test_same_seed_gives_a_byte_identical_capture_and_another_seed_does_not(tmp_path):
    first = _dry_run(tmp_path / "a.jsonl")
    again = _dry_run(tmp_path / "b.jsonl")
    assert first == again
    other = _dry_run(tmp_path / "c.jsonl", seed=12)
    assert other != first
    lines = [json.loads(line) for line in first.decode().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["seed"] == 11 and lines[0]["scenario"] == "province-mix"
    uplinks = [x for x in lines if x["type"] == "uplink"]
    assert len(uplinks) > 1000
    assert {u["transport"] for u in uplinks} == {"mqtt", "coap", "http"}
    assert [u["t"] for u in uplinks] == sorted(u["t"] for u in uplinks)       # in arrival order
    # Compressed captures are deterministic too (no time or name in the gzip header).
    gz1, gz2 = _dry_run(tmp_path / "a.jsonl.gz"), _dry_run(tmp_path / "b.jsonl.gz")
    assert gz1 == gz2 and gzip.decompress(gz1) == first
