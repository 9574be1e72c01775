"""The fuzz runner itself: a short run on CJ/T 188 finds nothing, and a planted bug is found."""

from __future__ import annotations

import decoders
from tests.fuzz.fuzz_codecs import fuzz_codec, main, report


def test_fuzz_cjt188_two_thousand_inputs(tmp_path, capsys):
    assert main(["--codec", "cjt188", "--count", "2000", "--seed", "3", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "cjt188: 2,000 inputs" in out and "OK" in out
    assert not list(tmp_path.iterdir())


def test_a_disagreement_is_reported_with_the_input(tmp_path, monkeypatch):
    codec = decoders.get_codec("cjt188")
    broken = type(codec)(**{**{f: getattr(codec, f) for f in codec.__dataclass_fields__},
                            "decode": lambda payload, settings: {"wrong": True}})
    monkeypatch.setitem(decoders.registry._LOADED, "cjt188", broken)
    result = fuzz_codec("cjt188", 500, 1, log=lambda s: None)
    assert not result.ok
    lines = report(result, tmp_path)
    assert any("finding 0" in line for line in lines)
    assert list(tmp_path.glob("cjt188-*.hex"))
