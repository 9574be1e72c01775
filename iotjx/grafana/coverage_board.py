"""The Coverage board's panels (see `iotjx.grafana.panels` for the conventions): each target's value,
pace and verdict as analytics.coverage computes them, its history, the eleven cities on a map, the
breakdown by city, pilot and network, and radio quality by city and cell."""

from __future__ import annotations

from iotjx.db.migrations import CITIES
from iotjx.grafana.panels import DEVICE_FILTER, LOCAL_TZ, SITE_FILTER, Panel, day_time, local_days, of_devices

# Coordinates (WGS-84, degrees, rounded to 0.01°) of each prefecture-level city's seat (its municipal
# government), as the cities' Wikipedia articles give them (e.g. Ganzhou 25°49′52″N 114°55′59″E); public
# facts, only needed to place one marker per city.  tests/grafana/test_boards.py holds them inside the
# province's published extent (24°29′–30°05′ N, 113°35′–118°29′ E).
CITY_COORDINATES: dict[int, tuple[float, float]] = {
    360100: (28.68, 115.86), 360200: (29.27, 117.18), 360300: (27.62, 113.85), 360400: (29.71, 116.00),
    360500: (27.82, 114.92), 360600: (28.26, 117.07), 360700: (25.83, 114.93), 360800: (27.11, 114.99),
    360900: (27.80, 114.38), 361000: (27.95, 116.36), 361100: (28.45, 117.94),
}
assert set(CITY_COORDINATES) == {code for code, _, _ in CITIES}

def _snapshot_day() -> str:
    return (f"SELECT max(day) AS day FROM coverage_snapshot_days "
            f"WHERE day <= ($__timeTo()::timestamptz AT TIME ZONE '{LOCAL_TZ}')::date")


def coverage_panels(targets: dict[str, tuple[str, bool]]) -> tuple[Panel, ...]:
    """The Coverage board's panels; `targets` (target id → (deadline as an ISO day, whether operators
    enter its figure)) come from the targets catalogue, which the database does not hold."""
    values = ", ".join(f"('{tid}', date '{day}', {str(operator).lower()})"
                       for tid, (day, operator) in sorted(targets.items()))
    cities = ", ".join(f"({code}, {lat:.2f}, {lon:.2f})" for code, (lat, lon) in sorted(CITY_COORDINATES.items()))
    figure = ("(SELECT e.value FROM e WHERE e.target_id = {tid} AND e.as_of <= {day} "
              "ORDER BY e.as_of DESC LIMIT 1)")
    return (
        Panel("Targets: value, pace and verdict", "table", width=24,
              columns=("target_id", "day", "value", "target_value", "progress_pct", "deadline", "needed_per_day",
                       "observed_per_day", "verdict"),
              description=("The latest daily snapshot up to the end of the range (coverage_snapshots; an operator "
                           "target's figure from its entries, a late entry counting for the day it describes). "
                           "Pace as analytics.coverage.pace: needed = what remains / days left; observed = the "
                           "change since the earliest daily value of the 30 days before, per day; at risk when "
                           "that pace does not reach the target by its deadline."), sql=f"""
WITH t(target_id, deadline, operator) AS (VALUES {values}),
     d AS ({_snapshot_day()}),
     e AS (SELECT DISTINCT ON (l.target_id, l.as_of) l.target_id, l.as_of, l.value
             FROM target_progress_log l, d
            WHERE l.as_of <= d.day
            ORDER BY l.target_id, l.as_of, l.entered_at DESC, l.entry_id DESC),
     n AS (SELECT cs.target_id, cs.day, cs.target_value, t.deadline,
                  CASE WHEN t.operator THEN {figure.format(tid="cs.target_id", day="cs.day")} ELSE cs.value END AS value,
                  CASE WHEN t.operator THEN {figure.format(tid="cs.target_id", day="t.deadline")}
                       ELSE (SELECT x.value FROM coverage_snapshots x
                              WHERE x.target_id = cs.target_id AND x.day = t.deadline) END AS at_deadline
             FROM coverage_snapshots cs JOIN d ON cs.day = d.day JOIN t ON t.target_id = cs.target_id),
     b AS ((SELECT DISTINCT ON (cs.target_id) cs.target_id, cs.day, cs.value
              FROM coverage_snapshots cs JOIN t ON t.target_id = cs.target_id AND NOT t.operator, d
             WHERE cs.day >= d.day - 30 AND cs.day < d.day AND cs.value IS NOT NULL
             ORDER BY cs.target_id, cs.day)
           UNION ALL
           SELECT o.target_id, o.day, {figure.format(tid="o.target_id", day="o.day")}
             FROM (SELECT e.target_id, greatest(min(e.as_of), d.day - 30) AS day
                     FROM e, d WHERE e.as_of < d.day GROUP BY e.target_id, d.day) o)
SELECT n.target_id, n.day, n.value, n.target_value,
       round((100 * n.value / n.target_value)::numeric, 1) AS progress_pct, n.deadline,
       CASE WHEN n.deadline >= n.day AND n.value < n.target_value
            THEN (n.target_value - n.value) / greatest(n.deadline - n.day, 1) END AS needed_per_day,
       (n.value - b.value) / nullif(n.day - b.day, 0) AS observed_per_day,
       CASE WHEN n.deadline < n.day THEN
                 CASE WHEN n.at_deadline IS NULL THEN 'unknown'
                      WHEN n.at_deadline >= n.target_value THEN 'met' ELSE 'missed' END
            WHEN n.value IS NULL THEN 'unknown'
            WHEN n.value >= n.target_value THEN 'met'
            WHEN b.value IS NULL THEN 'unknown'
            WHEN n.value <= b.value THEN 'at_risk'
            WHEN n.day + ceil((n.target_value - n.value) * (n.day - b.day) / (n.value - b.value))::int > n.deadline
                 THEN 'at_risk'
            ELSE 'on_track' END AS verdict
  FROM n LEFT JOIN b ON b.target_id = n.target_id
 ORDER BY (n.deadline < n.day), n.deadline, n.target_id"""),
        Panel("Target history (% of target)", "timeseries", unit="percent", width=24, description=(
            "Each target's daily value as a share of the target (coverage_snapshots)."), sql=f"""
SELECT {day_time('cs.day')}, cs.target_id AS metric, 100 * cs.value / cs.target_value AS progress_pct
  FROM coverage_snapshots cs
 WHERE cs.value IS NOT NULL AND {local_days('cs.day')}
 ORDER BY 1, 2"""),
        Panel("Devices by city", "geomap", height=14,
              columns=("city", "latitude", "longitude", "registered", "active", "live"), description=(
                  "The eleven cities (marker size: registered devices) on the latest snapshot day "
                  "(coverage_breakdown_daily); coordinates of each city's seat, Wikipedia."), sql=f"""
WITH geo(code, latitude, longitude) AS (VALUES {cities}),
     d AS ({_snapshot_day()})
SELECT c.name_en AS city, g.latitude, g.longitude, coalesce(sum(b.registered), 0) AS registered,
       coalesce(sum(b.active), 0) AS active, coalesce(sum(b.live), 0) AS live
  FROM cities c JOIN geo g ON g.code = c.code
  LEFT JOIN (coverage_breakdown_daily b JOIN d ON b.day = d.day)
         ON b.city_code = c.code AND b.pilot IN ($pilot) AND b.network IN ($network)
 WHERE c.code IN ($city)
 GROUP BY 1, 2, 3 ORDER BY 1"""),
        Panel("Devices by city, pilot and network", "table", height=14,
              columns=("city", "pilot", "network", "registered", "active", "live", "live_pct"), description=(
                  "The breakdown of the latest snapshot day (coverage_breakdown_daily)."), sql=f"""
WITH d AS ({_snapshot_day()})
SELECT c.name_en AS city, b.pilot, b.network, b.registered, b.active, b.live,
       round(100.0 * b.live / nullif(b.active, 0), 1) AS live_pct
  FROM coverage_breakdown_daily b JOIN d ON b.day = d.day JOIN cities c ON c.code = b.city_code
 WHERE b.city_code IN ($city) AND b.pilot IN ($pilot) AND b.network IN ($network)
 ORDER BY 1, 2, 3"""),
        Panel("Radio quality by city", "table",
              columns=("city", "devices", "samples", "rsrp_dbm", "sinr_db", "ecl_mean"), description=(
                  "Mean RSRP, SINR and coverage enhancement level of the samples in the range "
                  "(rollup_radio_day)."), sql=f"""
SELECT c.name_en AS city, count(DISTINCT r.device_key) AS devices, sum(r.count) AS samples,
       round((sum(r.rsrp_dbm_sum) / nullif(sum(r.rsrp_dbm_n), 0))::numeric, 1) AS rsrp_dbm,
       round((sum(r.sinr_db_sum) / nullif(sum(r.sinr_db_n), 0))::numeric, 1) AS sinr_db,
       round((sum(r.ecl_sum) / nullif(sum(r.ecl_n), 0))::numeric, 2) AS ecl_mean
  FROM rollup_radio_day r {of_devices('r', 'device_key', None)}
   AND r.bucket > $__timeFrom()::timestamptz - interval '1 day' AND r.bucket <= $__timeTo()::timestamptz
 GROUP BY 1 ORDER BY 1"""),
        Panel("Weakest cells", "table",
              columns=("cell_id", "samples", "rsrp_dbm", "rsrp_dbm_min", "sinr_db", "ecl2_pct"), description=(
                  "Cells serving the chosen devices, weakest mean RSRP first (rollup_radio_cell_day; a cell "
                  "belongs to the devices whose latest sample named it, rollup_radio_latest)."), sql=f"""
SELECT r.cell_id, sum(r.count) AS samples,
       round((sum(r.rsrp_dbm_sum) / nullif(sum(r.rsrp_dbm_n), 0))::numeric, 1) AS rsrp_dbm,
       min(r.rsrp_dbm_min) AS rsrp_dbm_min,
       round((sum(r.sinr_db_sum) / nullif(sum(r.sinr_db_n), 0))::numeric, 1) AS sinr_db,
       round((100 * sum(r.ecl_2_sum) / nullif(sum(r.ecl_2_n), 0))::numeric, 1) AS ecl2_pct
  FROM rollup_radio_cell_day r
 WHERE r.bucket > $__timeFrom()::timestamptz - interval '1 day' AND r.bucket <= $__timeTo()::timestamptz
   AND r.cell_id IN (SELECT l.cell_id_last::bigint FROM rollup_radio_latest l
                       JOIN devices d ON d.device_key = l.device_key JOIN sites s ON s.site_id = d.site_id
                      WHERE {DEVICE_FILTER} AND {SITE_FILTER})
 GROUP BY 1 ORDER BY 3 NULLS LAST, 1 LIMIT 100"""),
    )
