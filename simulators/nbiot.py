"""How NB-IoT and Cat-1 devices reach the network: PSM wake-ups, the midnight burst, device clocks that
drift, radio figures that follow the site's coverage, and what the link does to an uplink on its way
(retransmitted duplicates, store-and-forward delays, corrupted frames).

Everything here is pure: random draws come from the `random.Random` the caller passes (one per device,
seeded from the scenario seed and the device id), so a scenario is deterministic given its seed.
Times are epoch seconds (UTC) of simulated time."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

CHINA_OFFSET_S = 8 * 3600          # device clocks and daily curves run on China time (UTC+8)
DAY_S = 86400.0

# Coverage classes of a site: mean RSRP (dBm) and its spread between devices of the site.  "deep" is a
# basement or a meter well, where NB-IoT needs its coverage enhancement repetitions (ECL 2).
COVERAGE_RSRP: dict[str, tuple[float, float]] = {
    "good": (-84.0, 6.0), "fair": (-99.0, 5.0), "poor": (-111.0, 4.0), "deep": (-122.0, 4.0),
}
COVERAGE_CLASSES = tuple(COVERAGE_RSRP)
# RSRP thresholds (dBm) between ECL 0/1 and 1/2.  The eNodeB configures two such thresholds
# (PROTOCOLS.md §3); these values are our choice, near the usual MCL 144 / 154 dB steps.
ECL_THRESHOLDS_DBM = (-110.0, -120.0)


def local_hour(t: float) -> int:
    """Hour of the day, China time, of epoch second `t`."""
    return int((t + CHINA_OFFSET_S) % DAY_S // 3600)


def local_midnight(t: float) -> float:
    """Epoch second of the China-time midnight that starts the day of `t`."""
    return t - (t + CHINA_OFFSET_S) % DAY_S


# --------------------------------------------------------------------------- radio

@dataclass(frozen=True, slots=True)
class RadioFix:
    """The radio figures of one uplink, as a module reports them (AT+CESQ / carrier envelope)."""

    rsrp_dbm: float
    sinr_db: float
    ecl: int
    pci: int
    cell_id: int

    def as_dict(self) -> dict[str, float | int]:
        return {"rsrp_dbm": self.rsrp_dbm, "sinr_db": self.sinr_db, "ecl": self.ecl, "pci": self.pci,
                "cell_id": self.cell_id}


@dataclass(frozen=True, slots=True)
class RadioSite:
    """A device's place in the network: its serving cell and its own mean RSRP (site class + where in
    the building it sits)."""

    coverage: str
    mean_rsrp_dbm: float
    pci: int
    cell_id: int

    @classmethod
    def place(cls, coverage: str, site_rng: random.Random, device_rng: random.Random) -> RadioSite:
        """A device at a site of this coverage class; `site_rng` draws the same cell for the whole site."""
        if coverage not in COVERAGE_RSRP:
            raise ValueError(f"coverage {coverage!r} is not one of {', '.join(COVERAGE_CLASSES)}")
        mean, spread = COVERAGE_RSRP[coverage]
        pci, cell = site_rng.randrange(504), site_rng.randrange(1 << 28)
        return cls(coverage, mean + device_rng.gauss(0.0, spread), pci, cell)

    def fix(self, rng: random.Random) -> RadioFix:
        """One uplink's figures: RSRP fades around the device's mean; SINR follows RSRP; ECL from RSRP."""
        rsrp = round(min(-44.0, max(-140.0, self.mean_rsrp_dbm + rng.gauss(0.0, 2.5))), 1)
        sinr = min(30.0, max(-10.0, 0.55 * (rsrp + 125.0) - 3.0 + rng.gauss(0.0, 2.5)))
        return RadioFix(rsrp, round(sinr, 1), ecl_of(rsrp), self.pci, self.cell_id)


def ecl_of(rsrp_dbm: float) -> int:
    """Coverage enhancement level the cell assigns for this RSRP."""
    if rsrp_dbm >= ECL_THRESHOLDS_DBM[0]:
        return 0
    return 1 if rsrp_dbm >= ECL_THRESHOLDS_DBM[1] else 2


def uplink_latency_s(network: str, ecl: int, rng: random.Random) -> float:
    """Seconds from the device deciding to send to the bytes reaching the server: RRC set-up (and for
    NB-IoT the repetitions of its coverage level) and the core network."""
    if network == "cat1":
        return rng.uniform(0.05, 0.4)
    return rng.uniform(0.8, 2.5) * (1, 2, 4)[ecl]


# --------------------------------------------------------------------------- device clocks

@dataclass(frozen=True, slots=True)
class DeviceClock:
    """A device's real-time clock: set with an error `offset_s` at `set_at`, then drifting by `drift_ppm`."""

    offset_s: float = 0.0
    drift_ppm: float = 0.0
    set_at: float = 0.0

    def device_time(self, t: float) -> float:
        """What the device's clock reads at true time `t`."""
        return t + self.offset_s + self.drift_ppm * 1e-6 * (t - self.set_at)

    def true_time(self, device_time: float) -> float:
        """The true time at which the clock reads `device_time`."""
        rate = self.drift_ppm * 1e-6
        return (device_time - self.offset_s + rate * self.set_at) / (1.0 + rate)

    @classmethod
    def draw(cls, rng: random.Random, offset_sd_s: float, drift_sd_ppm: float, set_at: float) -> DeviceClock:
        return cls(rng.gauss(0.0, offset_sd_s) if offset_sd_s else 0.0,
                   rng.gauss(0.0, drift_sd_ppm) if drift_sd_ppm else 0.0, set_at)


# --------------------------------------------------------------------------- wake-ups

@dataclass(frozen=True, slots=True)
class WakeSchedule:
    """When a periodic reporter wakes: slots `phase_s + k × interval_s` after local midnight on the
    device's own clock, each delayed by a random back-off of up to `jitter_s` (modules add one so that a
    building's meters do not all attach at once).  A device synchronised to midnight has a phase of a
    few minutes: together they make the midnight burst."""

    interval_s: float
    phase_s: float
    jitter_s: float
    clock: DeviceClock
    midnight: bool = False

    @classmethod
    def plan(cls, rng: random.Random, interval_s: float, *, network: str, jitter_s: float,
             midnight_share: float, midnight_spread_s: float, clock: DeviceClock) -> WakeSchedule:
        """A schedule for one device: NB-IoT reporters of a day or longer join the midnight burst with
        probability `midnight_share`; everyone else gets a random phase within its interval."""
        burst = network == "nbiot" and interval_s >= DAY_S and rng.random() < midnight_share
        phase = rng.uniform(0.0, midnight_spread_s) if burst else rng.uniform(0.0, interval_s)
        jitter = jitter_s if network == "nbiot" else min(jitter_s, 0.05 * interval_s)
        return cls(float(interval_s), phase, jitter, clock, burst)

    def first_slot(self, t: float) -> float:
        """The first slot (on the device's clock) whose wake-up can fall at or after true time `t`."""
        dev = self.clock.device_time(t)
        base = local_midnight(dev) + self.phase_s - self.interval_s
        return base + math.ceil((dev - base) / self.interval_s) * self.interval_s

    def wake_at(self, slot: float, rng: random.Random) -> float:
        """True time of the wake-up for a slot: the slot plus this wake's back-off, on the device clock."""
        return self.clock.true_time(slot + (rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0))


# --------------------------------------------------------------------------- what the network does

@dataclass(frozen=True, slots=True)
class Fate:
    """What the network does to one frame on its way to the server."""

    corrupt: bool                         # damaged before it left the device
    latency_s: float                      # radio and core network
    held_s: float                         # store-and-forward: kept by the device this long (0: on time)
    duplicate_after_s: float | None       # the same bytes arrive again this long after the first


def fate(rng: random.Random, behaviour, network: str, ecl: int) -> Fate:
    """Draw a frame's fate from its device's link stream.  `behaviour` has the rates of
    `simulators.scenario.Behaviour`.  All three decisions are drawn for every frame, whatever the
    rates, so that changing one rate moves no other draw."""
    u_corrupt, u_late, u_duplicate = rng.random(), rng.random(), rng.random()
    latency = uplink_latency_s(network, ecl, rng)
    held = rng.uniform(*behaviour.late_delay_s) if u_late < behaviour.late else 0.0
    again = rng.uniform(*behaviour.retransmit_delay_s) if u_duplicate < behaviour.duplicate else None
    return Fate(u_corrupt < behaviour.corrupt, latency, held, again)


# --------------------------------------------------------------------------- corrupted frames

def corrupt_frame(codec: str, payload: bytes, rng: random.Random) -> bytes:
    """The frame as a noisy serial line or a firmware fault leaves it: one flipped bit inside the part a
    checksum or CRC covers (so the gateway can tell), or, for a codec without one, a lost last byte."""
    data = bytearray(payload)
    if codec == "cjt188" and len(data) > 16:
        start = data.index(0x68) + 11              # after 68 T A0..A6 C L: the DI and the data
        pos = rng.randrange(start, len(data) - 2)
    elif codec == "gb26875" and len(data) > 30:
        pos = rng.randrange(2, len(data) - 3)       # serial .. ADU; never the checksum or @@ / ##
        if pos in (24, 25):                          # the ADU length would make it a length error
            pos = 27
    elif codec == "gbt43229" and len(data) > 4:
        for _ in range(64):
            pos = rng.randrange(1, len(data) - 1)
            if data[pos] not in (0xC0, 0xDB) and data[pos - 1] != 0xDB:
                flipped = data[pos] ^ (1 << rng.randrange(8))
                if flipped not in (0xC0, 0xDB):    # SLIP bytes would be a framing error instead
                    data[pos] = flipped
                    return bytes(data)
        return bytes(data[:-2]) + b"\xc0"
    else:
        return bytes(data[:-1])
    data[pos] ^= 1 << rng.randrange(8)
    return bytes(data)
