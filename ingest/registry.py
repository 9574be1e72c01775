"""The device registry as the gateway sees it: device id -> what it is and how to decode it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import psycopg

from iotjx.model import Device

log = logging.getLogger(__name__)

_LOOKUP = """
    SELECT d.device_id, d.model, m.codec, d.pilot, d.network, d.site_id,
           coalesce(d.reporting_interval_s, m.reporting_interval_s), d.status, m.settings,
           coalesce(m.family, m.pilot), m.inner_codec, m.inner_settings, m.dedup_window_s
    FROM devices d JOIN device_models m USING (model)
    WHERE d.device_id = ANY(%s)"""


class DeviceRegistry:
    """A cache over the devices table.  Known devices are cached for `ttl_s`; an unknown id is asked
    again after `unknown_ttl_s`, so a device registered while the gateway runs is picked up quickly."""

    def __init__(self, connect: Callable[[], psycopg.Connection], ttl_s: float = 300.0,
                 unknown_ttl_s: float = 5.0) -> None:
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self._ttl_s = ttl_s
        self._unknown_ttl_s = unknown_ttl_s
        self._known: dict[str, tuple[float, Device]] = {}
        self._unknown: dict[str, float] = {}

    def lookup(self, device_ids: Iterable[str]) -> dict[str, Device]:
        """The registered, non-retired devices among `device_ids`."""
        now = time.monotonic()
        found: dict[str, Device] = {}
        missing: list[str] = []
        for device_id in set(device_ids):
            hit = self._known.get(device_id)
            if hit is not None and now - hit[0] < self._ttl_s:
                found[device_id] = hit[1]
            elif now - self._unknown.get(device_id, -1e18) >= self._unknown_ttl_s:
                missing.append(device_id)
        if missing:
            for device in self._fetch(missing):
                self._known[device.device_id] = (now, device)
                self._unknown.pop(device.device_id, None)
                found[device.device_id] = device
            for device_id in missing:
                if device_id not in found:
                    self._known.pop(device_id, None)
                    self._unknown[device_id] = now
        return {k: v for k, v in found.items() if v.status != "retired"}

    def _fetch(self, device_ids: list[str]) -> list[Device]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
            self._conn.autocommit = True
        try:
            rows = self._conn.execute(_LOOKUP, (device_ids,)).fetchall()
        except psycopg.OperationalError:
            self._conn.close()
            raise
        return [Device(device_id=r[0], model=r[1], codec=r[2], pilot=r[3], network=r[4], site_id=r[5],
                       reporting_interval_s=r[6], status=r[7], codec_settings=r[8] or {}, family=r[9],
                       inner_codec=r[10], inner_settings=r[11] or {}, dedup_window_s=r[12]) for r in rows]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
