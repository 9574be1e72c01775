"""What each board shows, as SQL for Grafana's PostgreSQL data source: a pure description (`Panel`),
laid out and encoded by `iotjx.grafana.boards`.

Conventions every query keeps (tests/grafana/ runs each one, macros expanded as Grafana expands them):

* Template variables are multi-value with "All", so a filter is always `… IN ($var)` (Grafana quotes
  each value and joins them with commas).  `$city` holds division codes, `$site` site ids, `$pilot` and
  `$network` the registry's words.
* Macros take plain column names (Grafana's macro pattern stops at the first `)`), and the time series
  give a column named `time`, numbers, and at most one text column (`metric`, the series name), ordered
  by time.
* Rollups first: the per-bucket panels read the writer's rollup tables (migration 11), the per-day water
  and coverage panels the analytics tables; the raw log only where nothing else carries the figure
  (uplinks by transport).

The Coverage board's panels, which also need the targets catalogue, are in `iotjx.grafana.coverage_board`."""

from __future__ import annotations

from dataclasses import dataclass

from analytics.traffic import DEFAULT_ROAD_CLASS, GRADE_SPEED_BANDS, GRADES
from iotjx.settings import Settings

LOCAL_TZ = "Asia/Shanghai"          # IOTJX_TIMEZONE's default: the local days of water_daily and the snapshots


@dataclass(frozen=True, slots=True)
class Panel:
    """One panel: `kind` is the Grafana panel type; `columns` the table's columns in order (None: a time
    series, `time` + numbers [+ `metric`]); `unit` Grafana's unit id for the numbers."""

    title: str
    kind: str
    sql: str
    columns: tuple[str, ...] | None = None
    unit: str | None = None
    description: str = ""
    width: int = 12
    height: int = 8
    threshold: float | None = None      # a time series' red line (e.g. a budget)

    @property
    def format(self) -> str:
        return "time_series" if self.columns is None else "table"



# The devices' filters, for queries joining devices d and sites s (a device without a site has no city
# and is left out once a city or site is chosen; with "All" it is counted when the join is LEFT).
DEVICE_FILTER = "d.pilot IN ($pilot) AND d.network IN ($network)"
SITE_FILTER = "s.city_code IN ($city) AND s.site_id IN ($site)"
# Live as /coverage counts it: the last uplink within IOTJX_LIVE_FACTOR × the reporting interval (the
# setting's default; the boards are generated, not configured).
LIVE_FACTOR = Settings.model_fields["live_factor"].default
SILENT = ("coalesce(st.last_seen, '-infinity') < $__timeTo()::timestamptz "
          f"- {LIVE_FACTOR:g} * make_interval(secs => coalesce(d.reporting_interval_s, m.reporting_interval_s))")


def local_days(col: str) -> str:
    """`col` (a local date) within the dashboard's range, both ends' local days included."""
    return (f"{col} BETWEEN ($__timeFrom()::timestamptz AT TIME ZONE '{LOCAL_TZ}')::date "
            f"AND ($__timeTo()::timestamptz AT TIME ZONE '{LOCAL_TZ}')::date")


def day_time(col: str) -> str:
    """A local date as the time series' `time`: the start of that day in LOCAL_TZ."""
    return f"({col}::timestamp AT TIME ZONE '{LOCAL_TZ}') AS time"


def _grade_case(speed: str) -> str:
    """The congestion grade of a space-mean speed (analytics.traffic: GB/T 33171-2016 bands of the default
    road class; a speed on an edge falls in the worse grade)."""
    edges = GRADE_SPEED_BANDS[DEFAULT_ROAD_CLASS]
    whens = " ".join(f"WHEN {speed} > {edge:g} THEN '{grade}'" for grade, edge in zip(GRADES, edges))
    return f"CASE WHEN {speed} IS NULL THEN NULL {whens} ELSE '{GRADES[-1]}' END"


# ----------------------------------------------------------------------------------------- variables

VARIABLES = {
    "city": ("City", "SELECT name_en AS __text, code::text AS __value FROM cities ORDER BY code"),
    "pilot": ("Pilot", "water,fire,traffic"),
    "network": ("Network", "nbiot,cat1"),
    "site": ("Site", "SELECT s.name || ' · ' || c.name_en AS __text, s.site_id::text AS __value FROM sites s "
                     "JOIN cities c ON c.code = s.city_code WHERE s.city_code IN ($city) ORDER BY 1, 2"),
}
QUERY_VARIABLES = ("city", "site")          # the others are custom lists


# ----------------------------------------------------------------------------------------- operations

OPERATIONS = (
    Panel("Uplinks received by transport", "timeseries", unit="short", description=(
        "Uplinks per minute in the raw log (stored and rejected), by transport. No rollup carries the "
        "transport, so this reads raw_uplinks (30 days kept)."), sql="""
SELECT $__timeGroupAlias(received_at, $__interval), transport AS metric,
       count(*) * 60000.0 / $__interval_ms AS uplinks_per_min
  FROM raw_uplinks
 WHERE $__timeFilter(received_at)
 GROUP BY 1, 2 ORDER BY 1"""),
    Panel("Rejects by reason", "timeseries", unit="short", description=(
        "Every reject, counted per minute by the writer (reject_tally), including those past a source's "
        "rate that are not kept as rows."), sql="""
SELECT $__timeGroupAlias(minute, $__interval), reason AS metric, sum(rejects)::float8 AS rejects
  FROM reject_tally
 WHERE $__timeFilter(minute)
 GROUP BY 1, 2 ORDER BY 1"""),
    Panel("Gateways: broker, queue, spool, duplicates, batch latency", "table", width=24, description=(
        "Each gateway's last heartbeat (gateway_status): broker connection, queue depth, uplinks in the "
        "spool, counters since start, and the p50/p95 of recent batches (collect → commit)."),
          columns=("gateway", "broker_connected", "heartbeat_age_s", "queue_depth", "spooled", "stored",
                   "duplicates", "rejected", "duplicate_pct", "batch_p50_s", "batch_p95_s"), sql="""
SELECT gateway_id AS gateway, broker_connected,
       round(extract(epoch FROM $__timeTo()::timestamptz - updated_at)::numeric, 1) AS heartbeat_age_s,
       queue_depth,
       coalesce((counters->'spool'->>'uplinks')::bigint, 0) AS spooled,
       coalesce((counters->>'stored')::bigint, 0) AS stored,
       coalesce((counters->>'duplicate')::bigint, 0) AS duplicates,
       coalesce((counters->>'rejected')::bigint, 0) AS rejected,
       round(100.0 * coalesce((counters->>'duplicate')::numeric, 0)
             / nullif(coalesce((counters->>'stored')::numeric, 0) + coalesce((counters->>'duplicate')::numeric, 0)
                      + coalesce((counters->>'rejected')::numeric, 0), 0), 2) AS duplicate_pct,
       (counters->'metrics'->'batch_seconds'->>'p50')::float8 AS batch_p50_s,
       (counters->'metrics'->'batch_seconds'->>'p95')::float8 AS batch_p95_s
  FROM gateway_status
 ORDER BY gateway_id"""),
    Panel("Devices online", "table", columns=("pilot", "network", "registered", "online", "online_pct"),
          description=(f"Active devices heard within {LIVE_FACTOR:g} × their reporting interval before the end of "
                       "the range (live, as /coverage counts it)."),
          sql=f"""
SELECT d.pilot, d.network, count(*) AS registered,
       count(*) FILTER (WHERE NOT ({SILENT})) AS online,
       round(100.0 * count(*) FILTER (WHERE NOT ({SILENT})) / count(*), 1) AS online_pct
  FROM devices d JOIN device_models m ON m.model = d.model
  LEFT JOIN device_state st ON st.device_id = d.device_id
  LEFT JOIN sites s ON s.site_id = d.site_id
 WHERE d.status = 'active' AND {DEVICE_FILTER} AND s.city_code IN ($city)
 GROUP BY 1, 2 ORDER BY 1, 2"""),
)


# ----------------------------------------------------------------------------------------- water

def of_devices(alias: str, key: str, pilot: str | None, more: str = "") -> str:
    """JOIN devices/sites/cities onto `alias` by `key` (then `more` joins), and the WHERE of the variables."""
    pilot_filter = f"d.pilot = '{pilot}' AND d.network IN ($network)" if pilot else DEVICE_FILTER
    return (f"JOIN devices d ON d.{key} = {alias}.{key} JOIN sites s ON s.site_id = d.site_id "
            f"JOIN cities c ON c.code = s.city_code{more}\n WHERE {pilot_filter} AND {SITE_FILTER}")


WATER = (
    Panel("Consumption by city", "timeseries", unit="m3", description=(
        "Daily consumption (m³) per city from the meters' registers (water_daily, local days)."), sql=f"""
SELECT {day_time('w.day')}, c.name_en AS metric, sum(w.consumption_m3) AS consumption_m3
  FROM water_daily w {of_devices('w', 'device_id', 'water')}
   AND {local_days('w.day')}
 GROUP BY 1, 2 ORDER BY 1"""),
    Panel("Consumption by district", "table", unit="m3",
          columns=("city", "district_code", "district", "meters", "consumption_m3", "reverse_m3"), description=(
              "Consumption over the range per county-level district (区/县, GB/T 2260) of the meters' sites, from "
              "water_daily; meters whose site has no district (unverified sites) under '(unknown district)'."),
          sql=f"""
SELECT c.name_en AS city, s.district_code,
       coalesce(di.name_zh || ' ' || di.name_en, '(unknown district)') AS district, count(DISTINCT w.device_id) AS meters,
       round(sum(w.consumption_m3)::numeric, 3) AS consumption_m3, round(sum(w.reverse_m3)::numeric, 3) AS reverse_m3
  FROM water_daily w {of_devices('w', 'device_id', 'water', ' LEFT JOIN districts di ON di.code = s.district_code')}
   AND {local_days('w.day')}
 GROUP BY 1, 2, 3 ORDER BY 1, 2 NULLS LAST"""),
    Panel("Consumption by site", "table", unit="m3",
          columns=("city", "site", "meters", "consumption_m3", "reverse_m3"), description=(
              "Consumption over the range per site (community / DMA), from water_daily."), sql=f"""
SELECT c.name_en AS city, s.name AS site, count(DISTINCT w.device_id) AS meters,
       round(sum(w.consumption_m3)::numeric, 3) AS consumption_m3, round(sum(w.reverse_m3)::numeric, 3) AS reverse_m3
  FROM water_daily w {of_devices('w', 'device_id', 'water')}
   AND {local_days('w.day')}
 GROUP BY 1, 2 ORDER BY 4 DESC"""),
    Panel("Minimum night flow and leakage by site", "timeseries", unit="short", description=(
        "Per site and night: the minimum over the night window's hourly slots of the meters' summed flow "
        "(m³/h), and the leakage estimate (20th percentile of the last 7 nights), from water_night."), sql=f"""
SELECT {day_time('n.day')}, s.name AS metric, n.mnf_m3h, n.leakage_m3h
  FROM water_night n JOIN sites s ON s.site_id = n.site_id
 WHERE {SITE_FILTER} AND {local_days('n.day')}
 ORDER BY 1, 2"""),
    Panel("Open leak and reverse-flow alerts", "table",
          columns=("device_id", "city", "site", "kind", "opened_at", "open_h", "detail"), description=(
              "Per-meter alerts still open (water_alerts): continuous flow for 24 h (a leak behind the meter) "
              "and reverse flow."), sql=f"""
SELECT a.device_id, c.name_en AS city, s.name AS site, a.kind, a.opened_at,
       round(extract(epoch FROM $__timeTo()::timestamptz - a.opened_at)::numeric / 3600, 1) AS open_h, a.detail
  FROM water_alerts a {of_devices('a', 'device_id', 'water')}
   AND a.closed_at IS NULL AND a.kind IN ('continuous_flow', 'reverse_flow')
 ORDER BY a.opened_at"""),
    Panel("Silent and stopped meters", "table",
          columns=("device_id", "city", "site", "last_seen", "silent_h", "stopped"), description=(
              f"Active meters not heard within {LIVE_FACTOR:g} × their reporting interval (never heard: no last_seen), "
              "and meters with an open 'stopped' alert (no consumption for 24 h)."), sql=f"""
SELECT d.device_id, c.name_en AS city, s.name AS site, st.last_seen,
       round(extract(epoch FROM $__timeTo()::timestamptz - st.last_seen)::numeric / 3600, 1) AS silent_h,
       EXISTS (SELECT 1 FROM water_alerts a WHERE a.device_id = d.device_id AND a.kind = 'stopped'
                                              AND a.closed_at IS NULL) AS stopped
  FROM devices d JOIN device_models m ON m.model = d.model
  JOIN sites s ON s.site_id = d.site_id JOIN cities c ON c.code = s.city_code
  LEFT JOIN device_state st ON st.device_id = d.device_id
 WHERE d.pilot = 'water' AND d.status = 'active' AND d.network IN ($network) AND {SITE_FILTER}
   AND ({SILENT} OR EXISTS (SELECT 1 FROM water_alerts a WHERE a.device_id = d.device_id AND a.kind = 'stopped'
                                                          AND a.closed_at IS NULL))
 ORDER BY st.last_seen NULLS FIRST, d.device_id"""),
    Panel("Battery low and valves closed, by city", "table",
          columns=("city", "meters", "battery_low", "valve_closed"), description=(
              "Each meter's latest state in the range, from its day rollup (rollup_water_day: the last battery "
              "flag and valve state of the day)."), sql=f"""
WITH latest AS (
    SELECT DISTINCT ON (r.device_key) r.device_key, r.battery_low_last, r.valve_closed_last
      FROM rollup_water_day r
     WHERE r.bucket > $__timeFrom()::timestamptz - interval '1 day' AND r.bucket <= $__timeTo()::timestamptz
     ORDER BY r.device_key, r.bucket DESC)
SELECT c.name_en AS city, count(*) AS meters,
       count(*) FILTER (WHERE l.battery_low_last = 1) AS battery_low,
       count(*) FILTER (WHERE l.valve_closed_last = 1) AS valve_closed
  FROM latest l {of_devices('l', 'device_key', 'water')}
 GROUP BY 1 ORDER BY 1"""),
    Panel("Share of readings with battery low or valve closed", "timeseries", unit="percent", description=(
        "Per time bucket, the share of the meters' readings flagging a low battery or a closed valve "
        "(rollup_water_site_15m)."), sql=f"""
SELECT $__timeGroupAlias(r.bucket, $__interval),
       100 * sum(r.battery_low_sum) / nullif(sum(r.battery_low_n), 0) AS battery_low_pct,
       100 * sum(r.valve_closed_sum) / nullif(sum(r.valve_closed_n), 0) AS valve_closed_pct
  FROM rollup_water_site_15m r JOIN sites s ON s.site_id = r.site_id
 WHERE $__timeFilter(r.bucket) AND {SITE_FILTER}
 GROUP BY 1 ORDER BY 1"""),
)


# ----------------------------------------------------------------------------------------- fire

FIRE = (
    Panel("Open alarms and faults", "table", width=24,
          columns=("alarm_id", "device_id", "city", "site", "kind", "state", "raised_at", "age_min", "description"),
          description="Alarm and fault episodes not yet cleared (fire_alarms), oldest first.", sql=f"""
SELECT a.alarm_id, a.device_id, c.name_en AS city, s.name AS site, a.kind, a.state, a.raised_at,
       round(extract(epoch FROM $__timeTo()::timestamptz - a.raised_at)::numeric / 60, 1) AS age_min, a.description
  FROM fire_alarms a {of_devices('a', 'device_id', 'fire')}
   AND a.state <> 'cleared'
 ORDER BY a.raised_at"""),
    Panel("Acknowledgement time against the 10 s budget", "timeseries", unit="s", threshold=10, description=(
        "Per acknowledged alarm: seconds from its arrival at the centre to the operator's acknowledgement, "
        "and from the detector's time label to arrival (GB 50440: transmission device → centre ≤ 10 s)."), sql=f"""
SELECT a.acked_at AS time,
       extract(epoch FROM a.acked_at - a.received_at)::float8 AS ack_s,
       greatest(extract(epoch FROM a.received_at - a.raised_at), 0)::float8 AS transmit_s
  FROM fire_alarms a {of_devices('a', 'device_id', 'fire')}
   AND a.kind = 'alarm' AND $__timeFilter(a.acked_at)
 ORDER BY 1"""),
    Panel("Acknowledgements within budget", "table",
          columns=("alarms", "acked", "acked_within_10s", "ack_p50_s", "ack_p95_s", "transmit_p95_s"),
          description="Alarms raised in the range; of those acknowledged, how many within 10 s of arrival.", sql=f"""
SELECT count(*) AS alarms, count(a.acked_at) AS acked,
       count(*) FILTER (WHERE a.acked_at - a.received_at <= interval '10 seconds') AS acked_within_10s,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM a.acked_at - a.received_at)) AS ack_p50_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM a.acked_at - a.received_at)) AS ack_p95_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM a.received_at - a.raised_at)) AS transmit_p95_s
  FROM fire_alarms a {of_devices('a', 'device_id', 'fire')}
   AND a.kind = 'alarm' AND $__timeFilter(a.raised_at)"""),
    Panel("Alarm and fault frames", "timeseries", unit="short", description=(
        "Frames flagging a fire alarm or a fault per time bucket (rollup_fire_site_15m)."), sql=f"""
SELECT $__timeGroupAlias(r.bucket, $__interval), sum(r.fire_alarm_sum) AS alarm_frames, sum(r.fault_sum) AS fault_frames
  FROM rollup_fire_site_15m r JOIN sites s ON s.site_id = r.site_id
 WHERE $__timeFilter(r.bucket) AND {SITE_FILTER}
 GROUP BY 1 ORDER BY 1"""),
    Panel("Faults raised per day", "timeseries", unit="short",
          description="Fault episodes by the day they were raised (fire_alarms, UTC days).", sql=f"""
SELECT $__timeGroupAlias(a.raised_at, 1d), count(*)::float8 AS faults
  FROM fire_alarms a {of_devices('a', 'device_id', 'fire')}
   AND a.kind = 'fault' AND $__timeFilter(a.raised_at)
 GROUP BY 1 ORDER BY 1"""),
    Panel("Offline detectors", "table", columns=("device_id", "city", "site", "last_seen", "silent_min"),
          description=(f"Active fire devices not heard within {LIVE_FACTOR:g} × their heartbeat interval (GB/T "
                       "26875.3 decoders call a device offline after two missed heartbeats, 10 min)."), sql=f"""
SELECT d.device_id, c.name_en AS city, s.name AS site, st.last_seen,
       round(extract(epoch FROM $__timeTo()::timestamptz - st.last_seen)::numeric / 60, 1) AS silent_min
  FROM devices d JOIN device_models m ON m.model = d.model
  JOIN sites s ON s.site_id = d.site_id JOIN cities c ON c.code = s.city_code
  LEFT JOIN device_state st ON st.device_id = d.device_id
 WHERE d.pilot = 'fire' AND d.status = 'active' AND d.network IN ($network) AND {SITE_FILTER} AND {SILENT}
 ORDER BY st.last_seen NULLS FIRST, d.device_id"""),
)


# ----------------------------------------------------------------------------------------- traffic

_VOLUME = "r.count_a_sum + r.count_b_sum + r.count_c_sum + r.unclassified_sum"
_SPEED = "sum(r.timed_n_sum) / nullif(sum(r.n_per_speed_sum), 0)"      # space-mean (harmonic) speed, km/h
_LANES = f"rollup_traffic_lane_5m r {of_devices('r', 'device_key', 'traffic')}"

TRAFFIC = (
    Panel("Volume by intersection", "timeseries", unit="short", description=(
        "Vehicles counted per time bucket at each intersection (all lanes; rollup_traffic_lane_5m)."), sql=f"""
SELECT $__timeGroupAlias(r.bucket, $__interval), s.name AS metric, sum({_VOLUME}) AS vehicles
  FROM {_LANES}
   AND $__timeFilter(r.bucket)
 GROUP BY 1, 2 ORDER BY 1"""),
    Panel("Occupancy by intersection and lane", "timeseries", unit="percent", description=(
        "Mean detector occupancy (%) per lane (rollup_traffic_lane_5m)."), sql=f"""
SELECT $__timeGroupAlias(r.bucket, $__interval), s.name || ' · lane ' || r.lane AS metric,
       sum(r.occupancy_pct_sum) / nullif(sum(r.occupancy_pct_n), 0) AS occupancy_pct
  FROM {_LANES}
   AND $__timeFilter(r.bucket)
 GROUP BY 1, 2 ORDER BY 1"""),
    Panel("Speed by intersection", "timeseries", unit="velocitykmh", description=(
        "Space-mean (harmonic) speed of the counted vehicles, km/h (rollup_traffic_lane_5m)."), sql=f"""
SELECT $__timeGroupAlias(r.bucket, $__interval), s.name AS metric, {_SPEED} AS speed_kmh
  FROM {_LANES}
   AND $__timeFilter(r.bucket)
 GROUP BY 1, 2 ORDER BY 1"""),
    Panel("Congestion grade by intersection and lane", "table",
          columns=("city", "intersection", "device_id", "lane", "vehicles", "occupancy_pct", "speed_kmh", "grade"),
          description=(f"Over the range: volume, occupancy and space-mean speed per lane, graded by the "
                       f"GB/T 33171-2016 speed bands of a {DEFAULT_ROAD_CLASS} road (analytics/traffic.py)."),
          sql=f"""
SELECT c.name_en AS city, s.name AS intersection, d.device_id, r.lane, sum({_VOLUME}) AS vehicles,
       round((sum(r.occupancy_pct_sum) / nullif(sum(r.occupancy_pct_n), 0))::numeric, 1) AS occupancy_pct,
       round(({_SPEED})::numeric, 1) AS speed_kmh,
       {_grade_case(_SPEED)} AS grade
  FROM {_LANES}
   AND $__timeFilter(r.bucket)
 GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"""),
    Panel("Parking occupancy by lot and scenic spot", "timeseries", unit="percent", width=24, description=(
        "Share of the parking sensors' reports saying occupied, per site (lots, scenic spots; "
        "rollup_parking_site_15m)."), sql=f"""
SELECT $__timeGroupAlias(r.bucket, $__interval), s.kind || ' · ' || s.name AS metric,
       100 * sum(r.occupied_sum) / nullif(sum(r.occupied_n), 0) AS occupied_pct
  FROM rollup_parking_site_15m r JOIN sites s ON s.site_id = r.site_id
 WHERE $__timeFilter(r.bucket) AND {SITE_FILTER}
 GROUP BY 1, 2 ORDER BY 1"""),
)
