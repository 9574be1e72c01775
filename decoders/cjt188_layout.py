"""CJ/T 188 tables shared by the reference decoder, the numba kernel and the encoder.

One table describes every record layout (which bytes after DI+SER hold which value, its BCD
width, its decimals and its unit class), so that the three readers of a frame cannot drift apart.
Sources: ng-gateway ``codec/di_schema.rs`` and ``frame/defs.rs`` (DIs, water/gas/freeze layouts,
unit table); the heat 901F layout follows the real 46-byte replies (L = 0x2E) read by the decoder in
public source id 12331798207, see ``docs/protocols/cjt188.md``.
"""

from __future__ import annotations

import numba as nb
import numpy as np

HEADER = 11                  # 68 T A0..A6 C L
READ_DATA_REPLY = 0x81
DI_CURRENT = 0x901F
DI_CLOCK = 0x907F

# Meter families by T byte (ng-gateway defs.rs): 1x water, 2x heat/cooling, 3x gas.
WATER, HEAT, GAS = 0, 1, 2

RECORD_KINDS = ("current", "clock", "history", "freeze")
CURRENT, CLOCK, HISTORY, FREEZE = range(4)

# Unit classes and each code's factor to the unit we output (0 = not a code of that class).
VOLUME, ENERGY, POWER, FLOW_RATE = range(4)
NO_UNIT = -1
UNIT_CLASS_NAMES = ("volume", "energy", "power", "flow_rate")
OUTPUT_UNITS = ("m³", "kWh", "W", "m³/h")

_J_PER_KWH = 3.6e6
# Code -> (class, factor to m³ / kWh / W / m³/h); CJ/T 188-2004 Table 13 via ng-gateway defs.rs.
UNIT_CODES: dict[int, tuple[int, float]] = {0x01: (ENERGY, 1.0 / _J_PER_KWH)}
for _base, _factor in ((0x02, 1e-3), (0x05, 1.0), (0x08, 1e3),                 # Wh, kWh, MWh
                       (0x0B, 1e3 / _J_PER_KWH), (0x0E, 1e6 / _J_PER_KWH),    # kJ, MJ
                       (0x11, 1e9 / _J_PER_KWH)):                             # GJ
    for _k in range(3):
        UNIT_CODES[_base + _k] = (ENERGY, _factor * 10 ** _k)
for _base, _factor in ((0x14, 1.0), (0x17, 1e3), (0x1A, 1e6)):                 # W, kW, MW
    for _k in range(3):
        UNIT_CODES[_base + _k] = (POWER, _factor * 10 ** _k)
UNIT_CODES[0x40] = (POWER, 1.0 / 3600.0)                                       # J/h
for _base, _factor in ((0x43, 1e3 / 3600.0), (0x46, 1e6 / 3600.0), (0x49, 1e9 / 3600.0)):
    for _k in range(3):
        UNIT_CODES[_base + _k] = (POWER, _factor * 10 ** _k)                   # kJ/h, MJ/h, GJ/h
for _k in range(6):
    UNIT_CODES[0x29 + _k] = (VOLUME, 1e-3 * 10 ** _k)                          # L .. m³×100
    UNIT_CODES[0x32 + _k] = (FLOW_RATE, 1e-3 * 10 ** _k)                       # L/h .. m³/h×100

UNIT_FACTOR = np.zeros((4, 256), dtype=np.float64)
for _code, (_class, _factor) in UNIT_CODES.items():
    UNIT_FACTOR[_class, _code] = _factor
DEFAULT_UNIT = (0x2C, 0x05, 0x17, 0x35)   # m³, kWh, kW, m³/h: what the encoder sends unless told

# Value columns (float64) and the unit-code column beside those that carry a unit byte.
VALUE_COLUMNS = ("flow_m3", "settlement_flow_m3", "settlement_heat_kwh", "heat_kwh", "heat_power_w",
                 "flow_rate_m3h", "supply_temp_c", "return_temp_c", "working_hours",
                 "settlement_cooling_kwh", "temperature_c", "pressure")
UNIT_COLUMNS = ("flow_unit", "settlement_unit", "settlement_heat_unit", "heat_unit", "heat_power_unit",
                "flow_rate_unit", "settlement_cooling_unit")
UNIT_COLUMN_OF = {"flow_m3": "flow_unit", "settlement_flow_m3": "settlement_unit",
                  "settlement_heat_kwh": "settlement_heat_unit", "heat_kwh": "heat_unit",
                  "heat_power_w": "heat_power_unit", "flow_rate_m3h": "flow_rate_unit",
                  "settlement_cooling_kwh": "settlement_cooling_unit"}

# Layouts: (name, kind, fields [(column, offset after SER, BCD bytes, decimals, unit class)],
# time offset or -1, status offset or -1, data bytes after SER).  A unit byte follows its value
# (or precedes it with the vendor setting unit_before_value), so a field spans BCD bytes + 1.
LAYOUTS = (
    ("water_current", CURRENT,
     (("flow_m3", 0, 4, 2, VOLUME), ("settlement_flow_m3", 5, 4, 2, VOLUME)), 10, 17, 19),
    ("heat_current", CURRENT,
     (("settlement_heat_kwh", 0, 4, 2, ENERGY), ("heat_kwh", 5, 4, 2, ENERGY),
      ("heat_power_w", 10, 4, 2, POWER), ("flow_rate_m3h", 15, 4, 4, FLOW_RATE),
      ("flow_m3", 20, 4, 2, VOLUME), ("supply_temp_c", 25, 3, 2, NO_UNIT),
      ("return_temp_c", 28, 3, 2, NO_UNIT), ("working_hours", 31, 3, 0, NO_UNIT)), 34, 41, 43),
    ("clock", CLOCK, (), 0, -1, 7),
    ("history_volume", HISTORY, (("settlement_flow_m3", 0, 4, 2, VOLUME),), -1, -1, 5),
    ("history_heat_month", HISTORY, (("settlement_heat_kwh", 0, 4, 2, ENERGY),), -1, -1, 5),
    ("history_heat", HISTORY,
     (("settlement_heat_kwh", 0, 4, 2, ENERGY), ("settlement_cooling_kwh", 5, 4, 2, ENERGY),
      ("settlement_flow_m3", 10, 4, 2, VOLUME)), -1, -1, 15),
    ("freeze", FREEZE,
     (("flow_m3", 7, 4, 2, VOLUME), ("flow_rate_m3h", 12, 4, 4, FLOW_RATE),
      ("temperature_c", 17, 3, 2, NO_UNIT), ("pressure", 20, 3, 2, NO_UNIT)), 0, -1, 23),
)
(WATER_CURRENT, HEAT_CURRENT, CLOCK_LAYOUT, HISTORY_VOLUME, HISTORY_HEAT_MONTH, HISTORY_HEAT,
 FREEZE_LAYOUT) = range(len(LAYOUTS))

_MAX_FIELDS = max(len(layout[2]) for layout in LAYOUTS)
LAYOUT_KIND = np.array([layout[1] for layout in LAYOUTS], dtype=np.int8)
TIME_OFFSET = np.array([layout[3] for layout in LAYOUTS], dtype=np.int64)
STATUS_OFFSET = np.array([layout[4] for layout in LAYOUTS], dtype=np.int64)
DATA_LEN = np.array([layout[5] for layout in LAYOUTS], dtype=np.int64)
FIELD_COUNT = np.array([len(layout[2]) for layout in LAYOUTS], dtype=np.int64)
# FIELDS[layout, k] = (value column, offset, BCD bytes, decimals, unit class, unit column or -1)
FIELD_TABLE = np.full((len(LAYOUTS), _MAX_FIELDS, 6), -1, dtype=np.int64)
for _li, _layout in enumerate(LAYOUTS):
    for _k, (_col, _off, _nb, _dec, _uc) in enumerate(_layout[2]):
        _unit_col = UNIT_COLUMNS.index(UNIT_COLUMN_OF[_col]) if _uc != NO_UNIT else -1
        FIELD_TABLE[_li, _k] = (VALUE_COLUMNS.index(_col), _off, _nb, _dec, _uc, _unit_col)
SCALE = np.array([10.0 ** d for d in range(5)], dtype=np.float64)


@nb.njit(cache=True)
def meter_family(t: int) -> int:
    """WATER / HEAT / GAS for a T byte, -1 for custom and unknown types."""
    if 0x10 <= t <= 0x19:
        return WATER
    if 0x20 <= t <= 0x29:
        return HEAT
    if 0x30 <= t <= 0x39:
        return GAS
    return -1


@nb.njit(cache=True)
def di_layout(di: int, family: int) -> int:
    """The layout of a DI's reply on a meter family, -1 when the public record does not give one."""
    hi = di >> 8
    lo = di & 0xFF
    if di == DI_CURRENT:
        return HEAT_CURRENT if family == HEAT else WATER_CURRENT
    if di == DI_CLOCK:
        return CLOCK_LAYOUT
    if hi == 0xD1 and 0x20 <= lo <= 0x2B:
        return HISTORY_HEAT_MONTH if family == HEAT else HISTORY_VOLUME
    if hi == 0xD2:
        return HISTORY_HEAT if family == HEAT else HISTORY_VOLUME
    if (hi == 0xD3 or hi == 0xD4) and family != HEAT:
        return FREEZE_LAYOUT
    return -1


@nb.njit(cache=True)
def resolve_di(d0: int, d1: int, family: int, di_mode: int) -> int:
    """The DI (canonical value) of the wire bytes d0 d1, or -1; di_mode 0 any, 1 low first, 2 high first.

    With ``any`` the standard's low-first reading wins when both readings name a known DI."""
    lo = np.int64(d0)      # uint8 from a buffer: keep the arithmetic in signed ints
    hi = np.int64(d1)
    low_first = (hi << 8) | lo
    high_first = (lo << 8) | hi
    if di_mode != 2 and di_layout(low_first, family) >= 0:
        return low_first
    if di_mode != 1 and di_layout(high_first, family) >= 0:
        return high_first
    return -1


def periods_ago(di: int) -> int | None:
    """How many settlement periods (history) or freezes back a DI reads; None for current/clock."""
    hi, lo = di >> 8, di & 0xFF
    if hi == 0xD1:
        return lo - 0x20 + 1
    if hi in (0xD2, 0xD3, 0xD4):
        return lo + 1
    return None


def freeze_trigger(di: int) -> str | None:
    """'timed' (D3xx) or 'instant' (D4xx) freeze; None for other DIs."""
    return {0xD3: "timed", 0xD4: "instant"}.get(di >> 8)
