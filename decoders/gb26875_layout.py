"""GB/T 26875.3-2011 layout constants and code tables shared by the decoder, the kernel and the encoder.

Sources: ``../shared/PROTOCOLS.md`` §2 (shootingfans/codec_gb26875_3_2011 ``constant/``, dgiot/dgiot
``apps/dgiot_gb26875``, the Four-Faith Go test id 30249531134, F9164-TD-NB frames id 43185598175).
"""

from __future__ import annotations

import numpy as np

HEADER = 27                  # @@ serial(2) version(2) time(6) source(6) destination(6) length(2) command(1)
FRAME_OVERHEAD = 30          # header + checksum + ##
MAX_ADU = 1024
DESCRIPTION = 31             # GB2312/GB18030 text of a component, NUL-padded
COMPONENT_STATE_SHORT = 15   # NB smoke detectors drop the description
MISSING_TIME = int(np.iinfo(np.int64).min)
CHECKSUM_FROM = {"serial": 2, "command": 26}   # index of the first byte summed into the checksum

SYSTEM_STATE, COMPONENT_STATE, ANALOG_VALUE, SYSTEM_OPERATION, SYSTEM_VERSION = 1, 2, 3, 4, 5
SYSTEM_TIME, UITD_STATE, UITD_OPERATION, UITD_VERSION, UITD_TIME = 8, 21, 24, 25, 28

# Information-object size per application type and where its time label starts (-1 = none).
# Type 2's 15-byte variant has its time right after the state word (offset 9).
OBJECT_SIZES: dict[int, int] = {1: 10, 2: 46, 3: 16, 4: 10, 5: 4, 8: 8, 21: 7, 24: 8, 25: 2, 28: 6}
TIME_AT: dict[int, int] = {1: 4, 2: 40, 3: 10, 4: 4, 5: -1, 8: 2, 21: 1, 24: 2, 25: -1, 28: 0}
SHORT_TIME_AT = 9

# Bit i of a status word -> flag name (dgiot status_8_2_1_2.json, shootingfans constant/type.go).
COMPONENT_FLAGS = ("normal_running", "fire_alarm", "fault", "shielded", "supervisory", "started",
                   "feedback", "delay", "power_fault")
SYSTEM_FLAGS = COMPONENT_FLAGS[:8] + ("main_power_fault", "backup_power_fault", "bus_fault", "manual_mode",
                                      "config_changed", "reset")
UITD_FLAGS = ("normal_running", "fire_alarm", "fault", "main_power_fault", "backup_power_fault",
              "centre_link_fault", "monitoring_line_fault")
SYSTEM_OPERATION_FLAGS = ("reset", "mute", "manual_alarm", "alarm_cancel", "self_test", "confirm", "test")
UITD_OPERATION_FLAGS = ("reset", "mute", "manual_alarm", "alarm_cancel", "self_check", "inspection_reply",
                        "test")
FLAG_NAMES = {SYSTEM_STATE: SYSTEM_FLAGS, COMPONENT_STATE: COMPONENT_FLAGS, UITD_STATE: UITD_FLAGS,
              SYSTEM_OPERATION: SYSTEM_OPERATION_FLAGS, UITD_OPERATION: UITD_OPERATION_FLAGS}

# Analog type -> (divisor, unit): value = raw / divisor (shootingfans constant/parameter.go, dgiot
# ana_8_2_1_3.json).  A divisor rather than a 0.1 factor keeps 3 -> 0.3 exact.  Vendor types (0x80 and
# up, e.g. the F9164's 0x80 and 0x88) pass through as raw / 1 with no unit.
ANALOG_TYPES: dict[int, tuple[int, str | None]] = {
    1: (1, None), 2: (100, "m"), 3: (10, "°C"), 4: (10, "MPa"), 5: (10, "kPa"), 6: (10, "%LEL"),
    7: (1, "s"), 8: (10, "V"), 9: (10, "A"), 10: (10, "L/s"), 11: (10, "m³/min"), 12: (1, "m/s"),
}


def flags(app_type: int, word: int) -> dict[str, bool]:
    """The named bits of a status or operation word of this application type."""
    return {name: bool(word >> bit & 1) for bit, name in enumerate(FLAG_NAMES[app_type])}


def word(app_type: int, named: dict[str, bool]) -> int:
    """The status or operation word whose named bits are set (the inverse of `flags`)."""
    names = FLAG_NAMES[app_type]
    unknown = set(named) - set(names)
    if unknown:
        raise ValueError(f"unknown flags for type {app_type}: {sorted(unknown)}; known: {list(names)}")
    return sum(1 << names.index(name) for name, on in named.items() if on)


def analog(analog_type: int, raw: int) -> tuple[float, str | None]:
    """(value in the type's unit, unit) of a signed raw analog reading."""
    divisor, unit = ANALOG_TYPES.get(analog_type, (1, None))
    return raw / divisor, unit
