"""CRC-16 variants that vendors put on GB/T 43229 frames and on parking-sensor reports.

The public record names no polynomial for GB/T 43229 (see docs/protocols/gbt43229.md), so the
variant is a vendor setting.  Each variant has a plain-Python form for the reference decoders and
a numba form for the kernels; tests hold both to the catalogue check values over b"123456789".
"""

from __future__ import annotations

import numba as nb

# Setting value -> the small int the kernels take.
CRC_KINDS: dict[str, int] = {"none": 0, "modbus": 1, "ccitt-false": 2}


def crc16(data: bytes, kind: str) -> int:
    """CRC of `data` for a setting value: modbus (0xA001 reflected, init FFFF), ccitt-false
    (0x1021, init FFFF, not reflected) or none (always 0)."""
    if kind == "none":
        return 0
    crc = 0xFFFF
    if kind == "modbus":
        for b in data:
            crc ^= b
            for _ in range(8):
                crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        return crc
    if kind == "ccitt-false":
        for b in data:
            crc ^= b << 8
            for _ in range(8):
                crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        return crc
    raise ValueError(f"crc must be one of {sorted(CRC_KINDS)}, not {kind!r}")


@nb.njit(cache=True)
def crc16_kernel(data, start, n, kind):
    """The same CRC over data[start:start + n]; `kind` is a CRC_KINDS value."""
    if kind == 0:
        return 0
    crc = 0xFFFF
    if kind == 1:
        for k in range(n):
            crc ^= data[start + k]
            for _ in range(8):
                if crc & 1:
                    crc = (crc >> 1) ^ 0xA001
                else:
                    crc >>= 1
        return crc
    for k in range(n):
        crc ^= data[start + k] << 8
        for _ in range(8):
            if crc & 0x8000:
                crc = ((crc << 1) ^ 0x1021) & 0xFFFF
            else:
                crc = (crc << 1) & 0xFFFF
    return crc


def check_crc_setting(kind: str) -> int:
    """The kernel code of a `crc` setting; ValueError naming the accepted values otherwise."""
    if kind not in CRC_KINDS:
        raise ValueError(f"crc must be one of {sorted(CRC_KINDS)}, not {kind!r}")
    return CRC_KINDS[kind]
