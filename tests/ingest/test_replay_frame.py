"""The replay topic's header (ingest/replay.py), byte by byte against struct's own reading of the
layout the module documents, and its bounds."""

from __future__ import annotations

import math
import struct

import pytest

from ingest import replay

NOW = 1_780_000_000.0


def test_the_header_is_version_origin_and_a_big_endian_double_before_the_bytes():
    frame = replay.pack(1_700_000_000.125, b"\x68\x10payload", replay.origin_code("http", "onenet"))
    assert frame[:10] == bytes([1, 3]) + struct.pack(">d", 1_700_000_000.125) and frame[10:] == b"\x68\x10payload"
    assert replay.unpack(frame, NOW, 300) == (1_700_000_000.125, 3, b"\x68\x10payload")
    assert [replay.origin_code(t, r) for t, r in (("mqtt", ""), ("coap", ""), ("http", "ctwing"))] == [0, 1, 2]
    with pytest.raises(ValueError):
        replay.origin_code("http", "")           # a push names its carrier


@pytest.mark.parametrize("frame, why", [
    (b"\x01\x00\x00", "10-byte header"),
    (bytes([2, 0]) + struct.pack(">d", NOW) + b"x", "version 2"),
    (bytes([1, 9]) + struct.pack(">d", NOW) + b"x", "origin 9"),
    (bytes([1, 0]) + struct.pack(">d", math.nan) + b"x", "not a number"),
    (bytes([1, 0]) + struct.pack(">d", 946684799.999) + b"x", "before 2000-01-01"),
    (bytes([1, 0]) + struct.pack(">d", NOW + 300.5) + b"x", "ahead of the gateway's clock"),
    (bytes([1, 0]) + struct.pack(">d", 1e300) + b"x", "ahead of the gateway's clock"),
])
def test_a_frame_out_of_bounds_says_why(frame, why):
    with pytest.raises(replay.ReplayFrameError, match=why):
        replay.unpack(frame, NOW, 300)


def test_the_bounds_themselves_are_honoured():
    assert replay.unpack(replay.pack(946684800.0, b""), NOW, 300)[0] == 946684800.0
    assert replay.unpack(replay.pack(NOW + 300, b"x"), NOW, 300)[0] == NOW + 300
