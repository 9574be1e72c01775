"""The device registry as the gateway sees it: device id -> what it is and how to decode it."""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from iotjx.model import Device

log = logging.getLogger(__name__)

# Columns in the order of Device's fields.  The settings come as text: equal texts share one decoded
# dict, and skipping psycopg's per-row JSON decoding makes a fetch cheaper too.
_LOOKUP = """
    SELECT d.device_id, d.model, m.codec, d.pilot, d.network, d.site_id,
           coalesce(d.reporting_interval_s, m.reporting_interval_s), d.status, m.settings::text,
           coalesce(m.family, m.pilot), m.inner_codec, m.inner_settings::text, m.dedup_window_s,
           m.max_payload_bytes, d.device_key
    FROM devices d JOIN device_models m USING (model)
    WHERE d.device_id = ANY(%s)"""

# Bounds of the sharing tables: they hold one entry per distinct model/site/status combination and per
# distinct settings text, so they stay tiny; past the bound they start over (sharing, not correctness).
_PROFILES_MAX = 10_000
_SETTINGS_MAX = 1_000


class DeviceRegistry:
    """A bounded cache over the devices table.

    A device found is cached for `ttl_s`, so a change to it (retired, moved, another model) is seen
    within `ttl_s`; an unknown id is asked again after `unknown_ttl_s`, so a device registered while
    the gateway runs is picked up quickly.  At most `cache_max` devices are cached (least recently
    looked up leaves first) and at most `unknown_max` unknown ids, so memory does not grow with the
    fleet nor with a flood of made-up ids.  Devices of one model share one `codec_settings` dict and
    one `inner_settings` dict: callers must treat them as read-only (the decoders do)."""

    def __init__(self, connect: Callable[[], psycopg.Connection], ttl_s: float = 300.0,
                 unknown_ttl_s: float = 5.0, cache_max: int = 200_000, unknown_max: int = 50_000) -> None:
        if cache_max < 1 or unknown_max < 1:
            raise ValueError(f"cache_max and unknown_max must be at least 1, not {cache_max} and {unknown_max}")
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self._ttl_s = ttl_s
        self._unknown_ttl_s = unknown_ttl_s
        self._cache_max = cache_max
        self._unknown_max = unknown_max
        self._known: OrderedDict[str, tuple[float, Device]] = OrderedDict()   # least recently used first
        self._unknown: OrderedDict[str, float] = OrderedDict()                # oldest first
        self._profiles: dict[tuple, tuple] = {}        # a row without its device id -> shared field values
        self._settings: dict[str, dict[str, Any]] = {}  # settings JSON text -> the one decoded dict

    def __len__(self) -> int:
        """The number of devices cached (unknown ids not counted)."""
        return len(self._known)

    @property
    def unknown_cached(self) -> int:
        """The number of unknown ids remembered."""
        return len(self._unknown)

    def lookup(self, device_ids: Iterable[str]) -> dict[str, Device]:
        """The registered, non-retired devices among `device_ids`."""
        now = time.monotonic()
        known, unknown = self._known, self._unknown
        found: dict[str, Device] = {}
        missing: list[str] = []
        for device_id in set(device_ids):
            hit = known.get(device_id)
            if hit is not None and now - hit[0] < self._ttl_s:
                known.move_to_end(device_id)
                found[device_id] = hit[1]
            elif now - unknown.get(device_id, -1e18) >= self._unknown_ttl_s:
                missing.append(device_id)
        if missing:
            for device in self._fetch(missing):
                device_id = device.device_id
                known[device_id] = (now, device)
                known.move_to_end(device_id)
                unknown.pop(device_id, None)
                found[device_id] = device
            for device_id in missing:
                if device_id not in found:
                    known.pop(device_id, None)
                    unknown.pop(device_id, None)
                    unknown[device_id] = now
            self._evict(now)
        return {k: v for k, v in found.items() if v.status != "retired"}

    def _evict(self, now: float) -> None:
        known, unknown = self._known, self._unknown
        while len(known) > self._cache_max:
            known.popitem(last=False)
        # Unknown ids are kept in the order they were asked, so the expired ones are at the front.
        while unknown and (len(unknown) > self._unknown_max
                           or now - next(iter(unknown.values())) >= self._unknown_ttl_s):
            unknown.popitem(last=False)

    def _fetch(self, device_ids: list[str]) -> list[Device]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
            self._conn.autocommit = True
        try:
            rows = self._conn.execute(_LOOKUP, (device_ids,)).fetchall()
        except psycopg.OperationalError:
            self._conn.close()
            raise
        return [Device(row[0], *self._profile(row[:-1]), key=row[-1]) for row in rows]

    def _profile(self, row: tuple) -> tuple:
        """Every field of a row's Device but its id, as objects shared by all devices alike."""
        key = row[1:]
        profile = self._profiles.get(key)
        if profile is None:
            if len(self._profiles) >= _PROFILES_MAX:
                self._profiles.clear()
            model, codec, pilot, network, site_id, interval, status, settings, family, inner, inner_settings, \
                dedup, max_payload = key
            profile = (model, codec, pilot, network, site_id, interval, status, self._decoded(settings),
                       family, inner, self._decoded(inner_settings), dedup, max_payload)
            self._profiles[key] = profile
        return profile

    def _decoded(self, text: str | None) -> dict[str, Any]:
        if text is None:
            return {}
        settings = self._settings.get(text)
        if settings is None:
            if len(self._settings) >= _SETTINGS_MAX:
                self._settings.clear()
            settings = self._settings[text] = json.loads(text) or {}
        return settings

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
