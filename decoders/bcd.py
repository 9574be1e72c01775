"""BCD and calendar helpers shared by the reference decoders and the numba kernels."""

from __future__ import annotations

import numba as nb

INVALID = -1


@nb.njit(cache=True, inline="always")
def bcd_byte(b: int) -> int:
    """Two BCD digits as an int 0..99, or -1 when a nibble is above 9."""
    hi = b >> 4
    lo = b & 0x0F
    if hi > 9 or lo > 9:
        return -1
    return hi * 10 + lo


@nb.njit(cache=True)
def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm)."""
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    mp = m + 9 if m <= 2 else m - 3
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


@nb.njit(cache=True)
def days_in_month(y: int, m: int) -> int:
    if m == 2:
        leap = (y % 4 == 0 and y % 100 != 0) or y % 400 == 0
        return 29 if leap else 28
    if m == 4 or m == 6 or m == 9 or m == 11:
        return 30
    return 31


def encode_bcd(value: int, nbytes: int) -> bytes:
    """`value` as `nbytes` BCD bytes, least significant pair first (CJ/T 188 order)."""
    if value < 0 or value >= 10 ** (2 * nbytes):
        raise ValueError(f"{value} does not fit in {nbytes} BCD bytes")
    out = bytearray()
    for _ in range(nbytes):
        value, pair = divmod(value, 100)
        out.append((pair // 10) << 4 | pair % 10)
    return bytes(out)
