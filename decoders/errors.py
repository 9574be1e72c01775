"""Reject reasons shared by every codec, as stable short codes and the small ints the kernels return."""

from __future__ import annotations

# Index = the status code a numba kernel writes for a frame; 0 means decoded.
# Append only: the codes are stored in the rejects table and must keep their meaning.
REASONS: tuple[str, ...] = (
    "ok",
    "truncated",       # the frame ends before its declared length
    "length",          # a length field disagrees with the bytes (stray bytes, wrong L)
    "framing",         # start/end delimiters missing or wrong
    "checksum",        # checksum or CRC mismatch
    "bcd",             # a BCD field holds a nibble above 9
    "unsupported",     # a valid frame of a kind this codec does not decode (function, DI, type)
    "unit",            # unknown unit code
    "time",            # a timestamp that is not a calendar date
    "device_error",    # the device answered with its abnormal-reply flag
    "syntax",          # text payloads: not JSON / CBOR / base64 / hex
    "schema",          # text payloads: a required field is missing or has the wrong type
    "value",           # a field outside its documented range
    "empty",           # no bytes at all
)
REASON_CODE: dict[str, int] = {name: i for i, name in enumerate(REASONS)}

OK = 0
TRUNCATED = REASON_CODE["truncated"]
LENGTH = REASON_CODE["length"]
FRAMING = REASON_CODE["framing"]
CHECKSUM = REASON_CODE["checksum"]
BCD = REASON_CODE["bcd"]
UNSUPPORTED = REASON_CODE["unsupported"]
UNIT = REASON_CODE["unit"]
TIME = REASON_CODE["time"]
DEVICE_ERROR = REASON_CODE["device_error"]
SYNTAX = REASON_CODE["syntax"]
SCHEMA = REASON_CODE["schema"]
VALUE = REASON_CODE["value"]
EMPTY = REASON_CODE["empty"]


class DecodeError(ValueError):
    """A payload that a codec refuses; `.reason` is one of `REASONS` and is what the rejects table stores."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASON_CODE:
            raise ValueError(f"unknown reject reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
