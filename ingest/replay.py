"""Replays that keep each uplink's original receive time: the replay topic's frame and its bounds.

A tester replaying a capture publishes on ``{prefix}/replay/{device_id}`` instead of
``{prefix}/up/{device_id}``.  Only service accounts of role *tester* may write there (the broker's
ACL, `iotjx.broker_sync.service_acl`; devices' listener allows no such topic), and the gateway
subscribes to it only with ``IOTJX_REPLAY_ENABLED``.  MQTT 3.1.1, the gateway's default, has no
properties, so the time travels in a small fixed header before the bytes (`pack` / `unpack`):

====  =====  ==============================================================================
byte  size   meaning
====  =====  ==============================================================================
0     1      version, 1
1     1      origin: how the uplink first arrived (`ORIGINS`: 0 mqtt, 1 coap, 2 a CTWing push,
             3 a OneNET push) — the uplink is stored with that transport, as the live run did
2     8      the original receive time: IEEE 754 double, big-endian, epoch seconds (UTC)
10    …      exactly the bytes the device (or the carrier platform) sent
====  =====  ==============================================================================

The gateway then uses the original time as the uplink's `received_at`: its dedup window, its
readings' time where the frame has no clock of its own, its raw-log day; so a capture replayed at any
speed, on any day, is stored as the live run stored it.  A time before 2000 or more than
``IOTJX_REPLAY_MAX_AHEAD_S`` ahead of the gateway's clock, or a frame too short or of another
version, is not honoured: the uplink is kept as a reject (reason `bad_original_time`, stamped with
the gateway's clock) and acknowledged.

Carrier pushes may instead go to the push endpoint itself, with the time in the header `TIME_HEADER`
and a tester account's login (HTTP Basic, the MQTT account's name and password): the push is then
checked as a live one is (token, signature, and a OneNET push's freshness against its original
time), and stored at that time.  The header without a tester's login is refused (401), with replays
off 403; a time out of bounds from a tester is kept as a `bad_original_time` reject (422)."""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime

VERSION = 1
HEAD = struct.Struct(">BBd")
# origin code -> (transport, carrier envelope or None)
ORIGINS: dict[int, tuple[str, str | None]] = {0: ("mqtt", None), 1: ("coap", None), 2: ("http", "ctwing"),
                                               3: ("http", "onenet")}
_CODES = {v: k for k, v in ORIGINS.items()}
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC).timestamp()     # no capture holds an older uplink
BAD_ORIGINAL_TIME = "bad_original_time"
# A carrier push replayed to the push endpoint: its original receive time, honoured only with a
# tester account's login (HTTP Basic) and `IOTJX_REPLAY_ENABLED` (ingest/http.py).
TIME_HEADER = "X-Iotjx-Received-At"


class ReplayFrameError(ValueError):
    """A replay frame that is not honoured; the message says why (kept as the reject's detail)."""


def origin_code(transport: str, route: str = "") -> int:
    """The origin byte of an uplink that first arrived over `transport` (`route`: a push's carrier)."""
    key = (transport, route or None) if transport == "http" else (transport, None)
    try:
        return _CODES[key]
    except KeyError:
        raise ValueError(f"no replay origin for transport {transport!r}"
                         + (f" via {route!r}" if route else "")) from None


def pack(received_at: float, payload: bytes, origin: int = 0) -> bytes:
    """The replay topic's message: the header, then `payload` unchanged."""
    if origin not in ORIGINS:
        raise ValueError(f"unknown replay origin {origin}")
    return HEAD.pack(VERSION, origin, float(received_at)) + payload


def unpack(frame: bytes, now: float, max_ahead_s: float) -> tuple[float, int, bytes]:
    """(original receive time, origin, payload) of a replay message; `ReplayFrameError` (with the
    reason) for one too short, of another version or origin, or with a time that is not a finite
    number between 2000-01-01 and `now` + `max_ahead_s`."""
    if len(frame) < HEAD.size:
        raise ReplayFrameError(f"a replay message starts with a {HEAD.size}-byte header; this one has "
                               f"{len(frame)} bytes")
    version, origin, t = HEAD.unpack_from(frame)
    if version != VERSION:
        raise ReplayFrameError(f"replay header version {version} (this gateway reads {VERSION})")
    if origin not in ORIGINS:
        raise ReplayFrameError(f"replay origin {origin} is none of {sorted(ORIGINS)}")
    return check_time(t, now, max_ahead_s), origin, frame[HEAD.size:]


def check_time(t: float, now: float, max_ahead_s: float) -> float:
    """`t` when it can be an original receive time: a finite number of epoch seconds from 2000-01-01
    to `now` + `max_ahead_s`; else `ReplayFrameError` saying which bound it breaks."""
    if not math.isfinite(t):
        raise ReplayFrameError("the original receive time is not a number")
    if t < EARLIEST:
        raise ReplayFrameError(f"the original receive time {_iso(t)} is before 2000-01-01")
    if t > now + max_ahead_s:
        raise ReplayFrameError(f"the original receive time {_iso(t)} is {t - now:,.0f} s ahead of the gateway's "
                               f"clock (at most {max_ahead_s:g} s: IOTJX_REPLAY_MAX_AHEAD_S)")
    return t


def parse_time(text: str, now: float, max_ahead_s: float) -> float:
    """An original receive time given as text (the HTTP header `TIME_HEADER`: epoch seconds, a
    decimal number), checked as `check_time` does; `ReplayFrameError` for anything else."""
    try:
        t = float(text.strip())
    except ValueError:
        raise ReplayFrameError(f"{TIME_HEADER} must be epoch seconds (a decimal number), not {text[:40]!r}") from None
    return check_time(t, now, max_ahead_s)


def _iso(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{t:g} (epoch s)"
