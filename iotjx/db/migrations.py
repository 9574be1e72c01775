"""Versioned, idempotent schema migrations, applied by `iotjx db upgrade` and at every start-up.

TimescaleDB when the extension can be created (hypertables, compression segmented by device,
retention); otherwise plain PostgreSQL with native range partitions by day, created ahead by
`ensure_partitions` and dropped by `drop_expired_partitions`.  The choice is made once, by the
first migration, and recorded in `iotjx_meta`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import psycopg

from .districts import DISTRICTS

log = logging.getLogger(__name__)

LOCK_ID = 0x10_7A_5C   # advisory lock serialising concurrent start-ups

CITIES = (
    (360100, "南昌", "Nanchang"), (360200, "景德镇", "Jingdezhen"), (360300, "萍乡", "Pingxiang"),
    (360400, "九江", "Jiujiang"), (360500, "新余", "Xinyu"), (360600, "鹰潭", "Yingtan"),
    (360700, "赣州", "Ganzhou"), (360800, "吉安", "Ji'an"), (360900, "宜春", "Yichun"),
    (361000, "抚州", "Fuzhou"), (361100, "上饶", "Shangrao"),
)

# Time-partitioned tables: name -> time column.  Their days are created ahead by the writer.
TIME_TABLES = {"raw_uplinks": "received_at", "water_readings": "time", "fire_events": "time",
               "traffic_flow": "time", "parking_events": "time", "radio_readings": "time"}
# The rollup tables (migration 11, analytics/rollups.py LEVELS) are partitioned like the readings, on
# their local bucket's start; compressed segmented by their first key column.
ROLLUP_TABLES = {
    "rollup_water_day": "device_key", "rollup_water_site_15m": "site_id", "rollup_fire_day": "device_key",
    "rollup_fire_site_15m": "site_id", "rollup_traffic_day": "device_key", "rollup_traffic_lane_5m": "device_key",
    "rollup_parking_day": "device_key", "rollup_parking_site_15m": "site_id", "rollup_radio_day": "device_key",
    "rollup_radio_cell_day": "cell_id"}
TIME_TABLES.update(dict.fromkeys(ROLLUP_TABLES, "bucket"))
STATE_TABLES = ("rollup_radio_latest",)
ROLLUP_FILLFACTOR = 70     # percent of a rollup page filled by inserts; the rest for HOT updates     # all-time rollups (one row per key): plain tables


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    apply: Callable[[psycopg.Connection, bool], None]


def _time_table(conn: psycopg.Connection, timescale: bool, name: str, columns: str, time_col: str,
                segment_by: str = "device_id") -> None:
    if timescale:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns}\n)")
        _hypertable(conn, name, time_col, segment_by)
    else:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns}\n) PARTITION BY RANGE ({time_col})")


def _hypertable(conn: psycopg.Connection, name: str, time_col: str, segment_by: str) -> None:
    """Daily chunks, compressed after 7 days, segmented by `segment_by`, newest first."""
    conn.execute(f"SELECT create_hypertable('{name}', '{time_col}', chunk_time_interval => interval '1 day', "
                 "if_not_exists => true)")
    conn.execute(f"ALTER TABLE {name} SET (timescaledb.compress, timescaledb.compress_segmentby = "
                 f"'{segment_by}', timescaledb.compress_orderby = '{time_col} DESC')")
    conn.execute(f"SELECT add_compression_policy('{name}', interval '7 days', if_not_exists => true)")


def _m1_foundation(conn: psycopg.Connection, timescale: bool) -> None:
    conn.execute("""
        CREATE TABLE IF NOT EXISTS cities (
            code integer PRIMARY KEY,            -- GB/T 2260 division code
            name_zh text NOT NULL,
            name_en text NOT NULL UNIQUE)""")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO cities (code, name_zh, name_en) VALUES (%s, %s, %s) ON CONFLICT (code) DO NOTHING",
                        CITIES)
    conn.execute("""
        CREATE TABLE IF NOT EXISTS sites (
            site_id bigserial PRIMARY KEY,
            city_code integer NOT NULL REFERENCES cities(code),
            kind text NOT NULL,                  -- residential, community, scenic_spot, campus, farm, dev_zone, road, ...
            name text NOT NULL,
            UNIQUE (city_code, kind, name))""")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS device_models (
            model text PRIMARY KEY,
            codec text NOT NULL,
            pilot text NOT NULL CHECK (pilot IN ('water', 'fire', 'traffic')),
            vendor text NOT NULL DEFAULT '',
            settings jsonb NOT NULL DEFAULT '{}',
            reporting_interval_s integer NOT NULL CHECK (reporting_interval_s > 0))""")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS devices (
            device_id text PRIMARY KEY,          -- IMEI or carrier platform id
            model text NOT NULL REFERENCES device_models(model),
            pilot text NOT NULL CHECK (pilot IN ('water', 'fire', 'traffic')),
            network text NOT NULL CHECK (network IN ('nbiot', 'cat1')),
            site_id bigint REFERENCES sites(site_id),
            installed_at timestamptz NOT NULL DEFAULT now(),
            status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive', 'retired')),
            reporting_interval_s integer CHECK (reporting_interval_s > 0),   -- NULL: the model's
            created_at timestamptz NOT NULL DEFAULT now())""")
    conn.execute("CREATE INDEX IF NOT EXISTS devices_site ON devices (site_id)")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS device_state (
            device_id text PRIMARY KEY REFERENCES devices(device_id) ON DELETE CASCADE,
            first_seen timestamptz NOT NULL,
            last_seen timestamptz NOT NULL,
            uplinks bigint NOT NULL DEFAULT 0)""")
    _time_table(conn, timescale, "raw_uplinks", """
            received_at timestamptz NOT NULL,
            device_id text NOT NULL,
            transport text NOT NULL,
            payload bytea NOT NULL,
            meta jsonb,
            outcome text NOT NULL                -- stored / rejected:<reason>""", "received_at")
    conn.execute("CREATE INDEX IF NOT EXISTS raw_uplinks_device ON raw_uplinks (device_id, received_at DESC)")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS rejected_uplinks (
            reject_id bigserial PRIMARY KEY,
            received_at timestamptz NOT NULL,
            device_id text NOT NULL,
            transport text NOT NULL,
            codec text,
            payload bytea NOT NULL,
            reason text NOT NULL,                -- decoders.REASONS code, or unknown_device
            detail text NOT NULL DEFAULT '',
            meta jsonb)""")
    conn.execute("CREATE INDEX IF NOT EXISTS rejected_uplinks_time ON rejected_uplinks (received_at DESC)")
    _time_table(conn, timescale, "water_readings", """
            time timestamptz NOT NULL,           -- when the gateway received the uplink
            device_id text NOT NULL,
            meter_address text,
            meter_type smallint,
            flow_m3 double precision,            -- current cumulative flow
            settlement_flow_m3 double precision,
            meter_time timestamptz,              -- the meter's own clock, UTC
            status integer,
            valve text,
            battery_low boolean,
            transport text NOT NULL""", "time")
    conn.execute("CREATE INDEX IF NOT EXISTS water_readings_device ON water_readings (device_id, time DESC)")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS target_progress (
            target_id text PRIMARY KEY,          -- operator-entered values for targets no device measures
            value double precision NOT NULL,
            note text NOT NULL DEFAULT '',
            updated_at timestamptz NOT NULL DEFAULT now())""")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS gateway_status (
            gateway_id text PRIMARY KEY,
            started_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            broker_connected boolean NOT NULL,
            queue_depth integer NOT NULL,
            counters jsonb NOT NULL DEFAULT '{}')""")
    conn.execute(r"""
        CREATE OR REPLACE FUNCTION iotjx_ensure_day_partitions(tbl text, first_day date, last_day date)
        RETURNS integer LANGUAGE plpgsql AS $$
        DECLARE d date; made integer := 0; part text;
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid
                           WHERE c.relname = tbl) THEN
                RETURN 0;                        -- a hypertable: TimescaleDB makes its own chunks
            END IF;
            PERFORM pg_advisory_xact_lock(hashtext('iotjx_partitions_' || tbl));
            d := first_day;
            WHILE d <= last_day LOOP
                part := format('%s_p%s', tbl, to_char(d, 'YYYYMMDD'));
                IF to_regclass(part) IS NULL THEN
                    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                                   part, tbl, d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC');
                    made := made + 1;
                END IF;
                d := d + 1;
            END LOOP;
            RETURN made;
        END $$""")
    conn.execute(r"""
        CREATE OR REPLACE FUNCTION iotjx_drop_day_partitions_before(tbl text, keep_from date)
        RETURNS integer LANGUAGE plpgsql AS $$
        DECLARE r record; dropped integer := 0;
        BEGIN
            FOR r IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     JOIN pg_class p ON p.oid = i.inhparent
                     WHERE p.relname = tbl AND c.relname ~ ('^' || tbl || '_p[0-9]{8}$')
                       AND to_date(right(c.relname, 8), 'YYYYMMDD') < keep_from LOOP
                EXECUTE format('DROP TABLE %I', r.relname);
                dropped := dropped + 1;
            END LOOP;
            RETURN dropped;
        END $$""")


def _m2_families(conn: psycopg.Connection, timescale: bool) -> None:
    """Fire, traffic, parking and radio tables; envelope models (inner codec) in the registry."""
    conn.execute("ALTER TABLE device_models ADD COLUMN IF NOT EXISTS family text")
    conn.execute("ALTER TABLE device_models ADD COLUMN IF NOT EXISTS inner_codec text")
    conn.execute("ALTER TABLE device_models ADD COLUMN IF NOT EXISTS inner_settings jsonb NOT NULL DEFAULT '{}'")
    conn.execute("ALTER TABLE water_readings ADD COLUMN IF NOT EXISTS extra jsonb")
    _time_table(conn, timescale, "fire_events", """
            time timestamptz NOT NULL,
            device_id text NOT NULL,
            transport text NOT NULL,
            sent_at timestamptz,                 -- the frame's time label, UTC
            serial integer,
            command smallint,
            app_type smallint,                   -- NULL: a frame without information objects
            object_index smallint,
            system_type smallint,
            system_address smallint,
            component_type smallint,
            component_address bigint,
            state integer,
            flags jsonb,
            fire_alarm boolean,
            fault boolean,
            description text,
            analog_type smallint,
            analog_value double precision,
            analog_unit text,
            operation smallint,
            operator smallint,
            software_version text,
            event_time timestamptz,
            extra jsonb""", "time")
    conn.execute("CREATE INDEX IF NOT EXISTS fire_events_device ON fire_events (device_id, time DESC)")
    conn.execute("CREATE INDEX IF NOT EXISTS fire_events_alarm ON fire_events (time DESC) WHERE fire_alarm")
    _time_table(conn, timescale, "traffic_flow", """
            time timestamptz NOT NULL,
            device_id text NOT NULL,
            transport text NOT NULL,
            division_code integer,
            device_type smallint,
            device_number integer,
            operation smallint,
            channel smallint,                    -- lane; NULL for a frame without lanes
            count_a integer,                     -- vehicles >= 12 m
            count_b integer,                     -- 6-12 m
            count_c integer,                     -- < 6 m
            occupancy_pct double precision,
            speed_kmh double precision,
            length_m double precision,
            headway_s double precision,
            gap_s double precision,
            stops double precision,
            stop_duration_s double precision,
            extra jsonb""", "time")
    conn.execute("CREATE INDEX IF NOT EXISTS traffic_flow_device ON traffic_flow (device_id, time DESC)")
    _time_table(conn, timescale, "parking_events", """
            time timestamptz NOT NULL,
            device_id text NOT NULL,
            transport text NOT NULL,
            occupied boolean,
            occupancy_changed boolean,
            frame_kind text,
            frame_counter integer,
            battery_low boolean,
            battery_mv integer,
            temperature_c double precision,
            mag_x integer,
            mag_y integer,
            mag_z integer,
            error_flags integer,
            extra jsonb""", "time")
    conn.execute("CREATE INDEX IF NOT EXISTS parking_events_device ON parking_events (device_id, time DESC)")
    _time_table(conn, timescale, "radio_readings", """
            time timestamptz NOT NULL,
            device_id text NOT NULL,
            transport text NOT NULL,
            source text NOT NULL,                -- ctwing / onenet / payload
            rsrp_dbm double precision,
            sinr_db double precision,
            rsrq_db double precision,
            ecl smallint,
            pci integer,
            cell_id bigint""", "time")
    conn.execute("CREATE INDEX IF NOT EXISTS radio_readings_device ON radio_readings (device_id, time DESC)")


def _m3_dedup(conn: psycopg.Connection, timescale: bool) -> None:
    """Keys of recently stored uplinks: the same uplink (device + payload digest) is stored once."""
    conn.execute("""
        CREATE TABLE IF NOT EXISTS uplink_dedup (
            device_id text NOT NULL,
            key bytea NOT NULL,                  -- BLAKE2b-128 of the payload as received
            received_at timestamptz NOT NULL,
            PRIMARY KEY (device_id, key))""")
    conn.execute("CREATE INDEX IF NOT EXISTS uplink_dedup_time ON uplink_dedup (received_at)")


def _m4_credentials_downlinks(conn: psycopg.Connection, timescale: bool) -> None:
    """CoAP device tokens (hashed) and commands queued for sleeping devices."""
    conn.execute("""
        CREATE TABLE IF NOT EXISTS device_credentials (
            device_id text PRIMARY KEY REFERENCES devices(device_id) ON DELETE CASCADE,
            scheme text NOT NULL DEFAULT 'coap-token' CHECK (scheme IN ('coap-token')),
            salt bytea NOT NULL,                 -- 16 random bytes
            token_hash bytea NOT NULL,           -- SHA-256(salt || token); the token itself is never stored
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now())""")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS downlinks (
            id bigserial PRIMARY KEY,
            device_id text NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
            kind text NOT NULL,                  -- valve_close, valve_open, set_interval, raw
            params jsonb NOT NULL DEFAULT '{}',
            payload bytea NOT NULL,              -- the bytes the device receives
            status text NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'sent', 'acknowledged', 'expired')),
            transport text,                      -- coap / mqtt: how it was last sent
            attempts integer NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now(),
            sent_at timestamptz,
            acked_at timestamptz,
            expires_at timestamptz NOT NULL)""")
    conn.execute("CREATE INDEX IF NOT EXISTS downlinks_device ON downlinks (device_id, id DESC)")
    conn.execute("CREATE INDEX IF NOT EXISTS downlinks_open ON downlinks (device_id, id) "
                 "WHERE status IN ('queued', 'sent')")


def _m5_dedup_windows(conn: psycopg.Connection, timescale: bool) -> None:
    """A dedup window per device model (frames without time or counter repeat themselves legitimately)."""
    conn.execute("ALTER TABLE device_models ADD COLUMN IF NOT EXISTS dedup_window_s double precision")
    conn.execute("ALTER TABLE uplink_dedup ADD COLUMN IF NOT EXISTS window_s double precision NOT NULL DEFAULT 86400")


def _m6_security(conn: psycopg.Connection, timescale: bool) -> None:
    """API keys (hashed) with roles and city scopes, the audit log of every write, and the MQTT
    accounts the broker's password file and ACL are generated from (iotjx/mqtt_accounts.py)."""
    conn.execute("""
        CREATE TABLE IF NOT EXISTS api_keys (
            key_id text PRIMARY KEY,             -- the public part of a key, shown in lists and the audit log
            name text NOT NULL DEFAULT '',
            role text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
            cities integer[],                    -- NULL: every city; else the division codes it may see
            secret_hash bytea NOT NULL,          -- SHA-256 of the key's secret part; the key is never stored
            created_at timestamptz NOT NULL DEFAULT now(),
            created_by text NOT NULL DEFAULT '',
            revoked_at timestamptz,
            last_used_at timestamptz)""")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS audit_log (
            audit_id bigserial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            actor text NOT NULL,                 -- key:<key_id>, or cli:<os user> for the command line
            key_id text,
            method text NOT NULL,                -- POST / PUT / PATCH / DELETE, or the CLI command
            route text NOT NULL,                 -- the route template, e.g. /devices/{device_id}
            target text,                         -- what was acted on: a device id, a target id, a key id
            change jsonb NOT NULL DEFAULT '{}',  -- what changed (never a secret)
            status integer)                      -- the HTTP status answered""")
    conn.execute("CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at DESC)")
    conn.execute("CREATE INDEX IF NOT EXISTS audit_log_key ON audit_log (key_id, at DESC)")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS mqtt_accounts (
            username text PRIMARY KEY,           -- a device's account is named by its device id
            role text NOT NULL CHECK (role IN ('device', 'gateway', 'tester')),
            device_id text UNIQUE REFERENCES devices(device_id) ON DELETE CASCADE,
            iterations integer NOT NULL CHECK (iterations > 0),
            salt bytea NOT NULL,
            password_hash bytea NOT NULL,        -- PBKDF2-HMAC-SHA512 (Mosquitto's $7$, EMQX's pbkdf2)
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            CHECK ((role = 'device') = (device_id IS NOT NULL)),
            CHECK (role <> 'device' OR username = device_id))""")
    # Whoever generates the broker's files listens here: an account changed, or a device's status.
    conn.execute("""
        CREATE OR REPLACE FUNCTION iotjx_notify_mqtt_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('iotjx_mqtt_accounts', TG_TABLE_NAME);
            RETURN NULL;
        END $$""")
    conn.execute("DROP TRIGGER IF EXISTS mqtt_accounts_changed ON mqtt_accounts")
    conn.execute("""CREATE TRIGGER mqtt_accounts_changed AFTER INSERT OR UPDATE OR DELETE ON mqtt_accounts
                    FOR EACH STATEMENT EXECUTE FUNCTION iotjx_notify_mqtt_accounts()""")
    conn.execute("DROP TRIGGER IF EXISTS devices_status_changed ON devices")
    conn.execute("""CREATE TRIGGER devices_status_changed AFTER UPDATE OF status OR DELETE ON devices
                    FOR EACH STATEMENT EXECUTE FUNCTION iotjx_notify_mqtt_accounts()""")


def _m7_bounds(conn: psycopg.Connection, timescale: bool) -> None:
    """The largest uplink per device model, and the per-minute tally of rejects by source: rows past
    a source's rate are counted here instead of written to rejected_uplinks (ingest/writer.py)."""
    conn.execute("ALTER TABLE device_models ADD COLUMN IF NOT EXISTS max_payload_bytes integer "
                 "CHECK (max_payload_bytes > 0)")           # NULL: only the gateway's IOTJX_UPLINK_MAX_BYTES
    conn.execute("""
        CREATE TABLE IF NOT EXISTS reject_tally (
            minute timestamptz NOT NULL,         -- the minute the rejects were received in (UTC)
            transport text NOT NULL,
            source text NOT NULL,                -- peer address, MQTT user name, else the transport
            reason text NOT NULL,                -- as rejected_uplinks.reason
            rejects bigint NOT NULL,             -- every reject of this key and minute
            suppressed bigint NOT NULL DEFAULT 0,    -- of which counted here only, not written as rows
            PRIMARY KEY (minute, transport, source, reason))""")


def _m8_coverage(conn: psycopg.Connection, timescale: bool) -> None:
    """Coverage the programme office can sign (README "Coverage"): the site catalogue (stable ids,
    aliases, grades, model sites, opening and closing), each model's network, every device's status
    history, every operator-entered figure, and the daily snapshots of targets and breakdown."""
    # Sites: a row with a `code` is a catalogue site (verified); without one, a site a device import
    # named in free text (unverified: never counted toward a plan target).
    for column in ("code text UNIQUE",                  # the catalogue's stable site id
                   "grade text",                        # 1A..5A for scenic spots; as the catalogue says otherwise
                   "model_site boolean NOT NULL DEFAULT false",
                   "model_site_since date",             # counted as a model site from this day (NULL: always)
                   "status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'closed'))",
                   "opened_on date",                    # in the catalogue from this day (NULL: always)
                   "closed_on date",                    # out of every denominator from this day
                   "created_at timestamptz NOT NULL DEFAULT now()",
                   "updated_at timestamptz NOT NULL DEFAULT now()"):
        conn.execute(f"ALTER TABLE sites ADD COLUMN IF NOT EXISTS {column}")
    conn.execute("ALTER TABLE sites DROP CONSTRAINT IF EXISTS sites_closed_has_date")
    conn.execute("ALTER TABLE sites ADD CONSTRAINT sites_closed_has_date "
                 "CHECK ((status = 'closed') = (closed_on IS NOT NULL))")
    conn.execute("ALTER TABLE sites DROP CONSTRAINT IF EXISTS sites_unverified_plain")
    conn.execute("ALTER TABLE sites ADD CONSTRAINT sites_unverified_plain "
                 "CHECK (code IS NOT NULL OR (grade IS NULL AND NOT model_site))")
    # Every name a catalogue site is known by (official name and aliases), normalised (iotjx.sites.name_key):
    # a device import naming a site by any of them attaches to the catalogue site.
    conn.execute("""
        CREATE TABLE IF NOT EXISTS site_names (
            city_code integer NOT NULL,
            kind text NOT NULL,
            name_key text NOT NULL,
            site_id bigint NOT NULL REFERENCES sites(site_id) ON DELETE CASCADE,
            name text NOT NULL,                  -- as the catalogue spells it
            is_alias boolean NOT NULL,
            PRIMARY KEY (city_code, kind, name_key))""")
    conn.execute("CREATE INDEX IF NOT EXISTS site_names_site ON site_names (site_id)")
    # A model's network (a Cat-1 model cannot be registered as NB-IoT); NULL: either.
    conn.execute("ALTER TABLE device_models ADD COLUMN IF NOT EXISTS network text "
                 "CHECK (network IN ('nbiot', 'cat1'))")
    # Every status a device has had, from when: "registered / active at day D" for any past day.
    conn.execute("""
        CREATE TABLE IF NOT EXISTS device_status_log (
            device_id text NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE ON UPDATE CASCADE,
            since timestamptz NOT NULL,
            status text NOT NULL,
            PRIMARY KEY (device_id, since))""")
    conn.execute("""
        INSERT INTO device_status_log (device_id, since, status)
        SELECT device_id, created_at, status FROM devices ON CONFLICT DO NOTHING""")
    conn.execute("""
        CREATE OR REPLACE FUNCTION iotjx_log_device_status() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO device_status_log (device_id, since, status)
                SELECT n.device_id, now(), n.status FROM new_rows n
                ON CONFLICT (device_id, since) DO UPDATE SET status = excluded.status;
            ELSE
                INSERT INTO device_status_log (device_id, since, status)
                SELECT n.device_id, now(), n.status FROM new_rows n JOIN old_rows o USING (device_id)
                WHERE n.status IS DISTINCT FROM o.status
                ON CONFLICT (device_id, since) DO UPDATE SET status = excluded.status;
            END IF;
            RETURN NULL;
        END $$""")
    conn.execute("DROP TRIGGER IF EXISTS devices_status_log_insert ON devices")
    conn.execute("""CREATE TRIGGER devices_status_log_insert AFTER INSERT ON devices
                    REFERENCING NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION iotjx_log_device_status()""")
    conn.execute("DROP TRIGGER IF EXISTS devices_status_log_update ON devices")
    conn.execute("""CREATE TRIGGER devices_status_log_update AFTER UPDATE ON devices
                    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION iotjx_log_device_status()""")
    # Operator-entered figures: every entry kept, with who, when, for which day and a note.
    conn.execute("""
        CREATE TABLE IF NOT EXISTS target_progress_log (
            entry_id bigserial PRIMARY KEY,
            target_id text NOT NULL,
            value double precision NOT NULL CHECK (value >= 0 AND value < 'Infinity'),
            as_of date NOT NULL,                 -- the day the figure describes
            note text NOT NULL DEFAULT '',
            actor text NOT NULL,                 -- key:<key_id> or cli:<os user>, as in audit_log
            entered_at timestamptz NOT NULL DEFAULT now())""")
    conn.execute("CREATE INDEX IF NOT EXISTS target_progress_log_target ON target_progress_log (target_id, as_of, entered_at)")
    if conn.execute("SELECT to_regclass('target_progress')").fetchone()[0] is not None:
        conn.execute("""
            INSERT INTO target_progress_log (target_id, value, as_of, note, actor, entered_at)
            SELECT target_id, value, (updated_at AT TIME ZONE 'Asia/Shanghai')::date, note, 'migrated', updated_at
            FROM target_progress WHERE value >= 0 AND value < 'Infinity'""")
        conn.execute("DROP TABLE target_progress")
    # Daily snapshots (local days): one row per day and target, and the breakdown of that day.  A day is
    # complete when its row in coverage_snapshot_days exists (written in the same transaction).
    conn.execute("""
        CREATE TABLE IF NOT EXISTS coverage_snapshot_days (
            day date PRIMARY KEY,
            state_at timestamptz NOT NULL,       -- the instant described: the end of the local day
            taken_at timestamptz NOT NULL DEFAULT now(),
            how text NOT NULL,                   -- scheduled / filled / retaken
            devices bigint NOT NULL,             -- devices registered at state_at
            duration_s double precision NOT NULL)""")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS coverage_snapshots (
            day date NOT NULL REFERENCES coverage_snapshot_days(day) ON DELETE CASCADE,
            target_id text NOT NULL,
            value double precision,              -- NULL: nothing measured (an operator target without entry)
            target_value double precision NOT NULL,   -- the target as the catalogue said that day
            registered bigint,                   -- devices (or catalogue sites) in scope
            active bigint,
            live bigint,
            sites bigint,                        -- site measures: catalogue sites in scope that day
            sites_meeting bigint,                -- …of which met the per-site minimum
            PRIMARY KEY (day, target_id))""")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS coverage_breakdown_daily (
            day date NOT NULL REFERENCES coverage_snapshot_days(day) ON DELETE CASCADE,
            city_code integer NOT NULL,          -- 0: devices without a site
            pilot text NOT NULL,
            network text NOT NULL,
            registered bigint NOT NULL,
            active bigint NOT NULL,
            live bigint NOT NULL,
            PRIMARY KEY (day, city_code, pilot, network))""")


def _m9_fire_alarms(conn: psycopg.Connection, timescale: bool) -> None:
    """Fire alarm and fault lifecycles per component (analytics/fire.py): one row per episode of a
    component's fire-alarm or fault flag, ordered by the frames' own time labels, with the operator's
    acknowledgement, clearing and false-alarm verdict; and how far update_alarms has read fire_events."""
    conn.execute("""
        CREATE TABLE IF NOT EXISTS fire_alarms (
            alarm_id bigserial PRIMARY KEY,
            device_id text NOT NULL,
            system_type smallint NOT NULL,
            system_address smallint NOT NULL,
            component_type smallint NOT NULL,
            component_address bigint NOT NULL,
            kind text NOT NULL CHECK (kind IN ('alarm', 'fault')),
            raised_at timestamptz NOT NULL,      -- the time label of the first frame showing the flag set
            received_at timestamptz NOT NULL,    -- when the first frame showing it arrived (the centre knew)
            description text,                    -- the component's text in the raising frame
            restored_at timestamptz,             -- the time label of the device's restore frame
            restore_received_at timestamptz,     -- …and when that frame arrived
            acked_at timestamptz,
            acked_by text,
            cleared_at timestamptz,              -- restored_at, or when an operator cleared it first
            cleared_by text,                     -- 'device' (a restore frame) or the operator
            false_alarm boolean,                 -- the operator's verdict (NULL: none given)
            note text NOT NULL DEFAULT '',
            verdict_by text,
            verdict_at timestamptz,
            updated_at timestamptz NOT NULL DEFAULT now(),
            state text GENERATED ALWAYS AS (
                CASE WHEN cleared_at IS NULL THEN
                          CASE WHEN acked_at IS NULL THEN 'active_unacked' ELSE 'active_acked' END
                     ELSE CASE WHEN acked_at IS NULL THEN 'cleared_unacked' ELSE 'cleared' END END) STORED,
            CHECK ((acked_at IS NULL) = (acked_by IS NULL)),
            CHECK ((cleared_at IS NULL) = (cleared_by IS NULL)),
            CHECK ((false_alarm IS NULL) = (verdict_by IS NULL)),
            UNIQUE (device_id, system_type, system_address, component_type, component_address, kind, raised_at))""")
    conn.execute("CREATE INDEX IF NOT EXISTS fire_alarms_open ON fire_alarms (raised_at) WHERE state <> 'cleared'")
    conn.execute("CREATE INDEX IF NOT EXISTS fire_alarms_raised ON fire_alarms (raised_at)")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS fire_alarm_progress (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            read_to timestamptz NOT NULL,        -- fire_events.time read so far (before the safety margin)
            updated_at timestamptz NOT NULL DEFAULT now())""")


def _m10_water(conn: psycopg.Connection, timescale: bool) -> None:
    """Water analytics (analytics/water.py): consumption per meter and local day from the cumulative
    register, the night-flow slots of each meter-night, minimum night flow and leakage per site, per-meter
    alerts with their open and close times, and how far update_water has read water_readings."""
    conn.execute("""
        CREATE TABLE IF NOT EXISTS water_daily (
            device_id text NOT NULL,
            day date NOT NULL,                   -- local day (Asia/Shanghai) of the later reading of each delta
            consumption_m3 double precision NOT NULL,   -- sum of the day's deltas (reverse flow counts negative)
            reverse_m3 double precision NOT NULL DEFAULT 0,   -- the negative part of it (<= 0)
            readings integer NOT NULL,           -- readings measured that day
            first_register_m3 double precision,
            last_register_m3 double precision,
            first_at timestamptz NOT NULL,       -- measurement time of the day's first and last reading
            last_at timestamptz NOT NULL,
            meter_address text,                  -- the meter at the day's last reading
            rollovers smallint NOT NULL DEFAULT 0,
            new_series smallint NOT NULL DEFAULT 0,     -- replacements / register resets seen that day
            reverse_flows smallint NOT NULL DEFAULT 0,
            night_m3h double precision[],        -- the meter's flow in each hourly slot of the night window
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (device_id, day))""")
    conn.execute("CREATE INDEX IF NOT EXISTS water_daily_day ON water_daily (day)")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS water_night (
            site_id bigint NOT NULL,
            day date NOT NULL,
            mnf_m3h double precision NOT NULL,   -- minimum over the window's hourly slots of the meters' sum
            meters integer NOT NULL,             -- meters with every slot of the night covered
            leakage_m3h double precision,        -- 20th percentile of mnf_m3h over this and the 6 previous days
            nights smallint,                     -- nights that percentile was taken over
            PRIMARY KEY (site_id, day))""")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS water_alerts (
            alert_id bigserial PRIMARY KEY,
            device_id text NOT NULL,
            kind text NOT NULL CHECK (kind IN ('continuous_flow', 'reverse_flow', 'stopped', 'battery_low',
                                               'valve_closed', 'valve_abnormal')),
            opened_at timestamptz NOT NULL,      -- measurement time of the reading that opened it
            closed_at timestamptz,               -- …and of the one that closed it (NULL: open)
            detail text NOT NULL DEFAULT '',
            UNIQUE (device_id, kind, opened_at))""")
    conn.execute("CREATE INDEX IF NOT EXISTS water_alerts_open ON water_alerts (opened_at) WHERE closed_at IS NULL")
    conn.execute("""
        CREATE TABLE IF NOT EXISTS water_progress (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            read_to timestamptz NOT NULL,        -- water_readings.time read so far (before the safety margin)
            updated_at timestamptz NOT NULL DEFAULT now())""")


def _m11_rollups(conn: psycopg.Connection, timescale: bool) -> None:
    """Rollups kept by the writer in each batch's transaction (analytics/rollups.py LEVELS; README
    "Rollups"): an integer key per device for them, and one table per level."""
    from analytics.rollups import LEVELS

    conn.execute("ALTER TABLE devices ADD COLUMN IF NOT EXISTS device_key bigint GENERATED BY DEFAULT AS IDENTITY")
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS devices_device_key ON devices (device_key)")
    made = {level.table for level in LEVELS}
    if made != set(ROLLUP_TABLES) | set(STATE_TABLES):
        raise RuntimeError(f"analytics.rollups.LEVELS names {sorted(made)}, migration 11 knows "
                           f"{sorted(set(ROLLUP_TABLES) | set(STATE_TABLES))}")
    for level in LEVELS:
        conn.execute(level.create_sql(partitioned=not timescale))
        if timescale and not level.all_time:
            _hypertable(conn, level.table, "bucket", ROLLUP_TABLES[level.table])
        if level.all_time or timescale:
            conn.execute(f"ALTER TABLE {level.table} SET (fillfactor = {ROLLUP_FILLFACTOR})")
    # A rollup row is updated by every batch that touches its bucket: pages kept partly free let those
    # updates stay heap-only (HOT: no index entry, less WAL).  Partitions of rollup tables are made so.
    conn.execute(r"""
        CREATE OR REPLACE FUNCTION iotjx_ensure_day_partitions(tbl text, first_day date, last_day date)
        RETURNS integer LANGUAGE plpgsql AS $$
        DECLARE d date; made integer := 0; part text; storage text := '';
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid
                           WHERE c.relname = tbl) THEN
                RETURN 0;                        -- a hypertable: TimescaleDB makes its own chunks
            END IF;
            IF tbl LIKE 'rollup\_%' THEN
                storage := format(' WITH (fillfactor = %s)', """ + str(ROLLUP_FILLFACTOR) + r""");
            END IF;
            PERFORM pg_advisory_xact_lock(hashtext('iotjx_partitions_' || tbl));
            d := first_day;
            WHILE d <= last_day LOOP
                part := format('%s_p%s', tbl, to_char(d, 'YYYYMMDD'));
                IF to_regclass(part) IS NULL THEN
                    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                                   part, tbl, d::timestamp AT TIME ZONE 'UTC', (d + 1)::timestamp AT TIME ZONE 'UTC')
                            || storage;
                    made := made + 1;
                END IF;
                d := d + 1;
            END LOOP;
            RETURN made;
        END $$""")


def _m12_dedup_claimed_at(conn: psycopg.Connection, timescale: bool) -> None:
    """When each dedup key was claimed (the gateway's clock), beside the uplink's `received_at`: a
    tester's replay claims keys at their original receive times, which may be days old, and the
    purge must keep those while the replay can still send a copy (ingest.writer.Writer.purge_dedup)."""
    conn.execute("ALTER TABLE uplink_dedup ADD COLUMN IF NOT EXISTS claimed_at timestamptz NOT NULL DEFAULT now()")


def _m13_redecode(conn: psycopg.Connection, timescale: bool) -> None:
    """Re-decoding rejects (ingest/redecode.py, `POST /rejects/redecode`): a reject that a later run
    stored is marked, in the transaction that wrote its readings, so that it is stored exactly once;
    the row itself (bytes, reason, detail) stays as received."""
    conn.execute("ALTER TABLE rejected_uplinks ADD COLUMN IF NOT EXISTS redecoded_at timestamptz")  # NULL: still a reject
    conn.execute("ALTER TABLE rejected_uplinks ADD COLUMN IF NOT EXISTS redecoded_by text")
    conn.execute("CREATE INDEX IF NOT EXISTS rejected_uplinks_device ON rejected_uplinks (device_id, received_at DESC)")
    # The API's lists page by (time, id), newest first: one index range scan per page however deep.
    conn.execute("CREATE INDEX IF NOT EXISTS rejected_uplinks_page ON rejected_uplinks (received_at, reject_id)")
    conn.execute("CREATE INDEX IF NOT EXISTS fire_alarms_page ON fire_alarms (raised_at, alarm_id)")
    conn.execute("CREATE INDEX IF NOT EXISTS water_alerts_page ON water_alerts (opened_at, alert_id)")


def _m14_jobs(conn: psycopg.Connection, timescale: bool) -> None:
    """Background jobs of the API (api/jobs.py): a re-decode asked by `POST /rejects/redecode` is a row
    here, queued, then run by a worker thread of an API process, which records its counts as it goes
    and its end (done, or failed with the error).  `cities` is the starting key's city scope."""
    conn.execute("""
        CREATE TABLE IF NOT EXISTS jobs (
            job_id bigserial PRIMARY KEY,
            kind text NOT NULL CHECK (kind IN ('redecode')),
            state text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'failed')),
            params jsonb NOT NULL DEFAULT '{}',  -- what was asked (the re-decode's filter)
            cities integer[],                    -- NULL: every city; else the starting key's cities
            actor text NOT NULL,                 -- key:<key_id>, as the audit log names it
            key_id text,
            created_at timestamptz NOT NULL DEFAULT now(),
            started_at timestamptz,
            finished_at timestamptz,
            examined bigint NOT NULL DEFAULT 0,
            stored bigint NOT NULL DEFAULT 0,
            still_rejected jsonb NOT NULL DEFAULT '{}',   -- reason -> count
            last_reject_id bigint,
            error text,
            CHECK ((state IN ('done', 'failed')) = (finished_at IS NOT NULL)),
            CHECK (state <> 'running' OR started_at IS NOT NULL))""")
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_page ON jobs (created_at, job_id)")
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_open ON jobs (kind, job_id) WHERE state IN ('queued', 'running')")
    # Who set a device's credential (GET /credentials): the audit row of its device at its updated_at.
    conn.execute("CREATE INDEX IF NOT EXISTS audit_log_target ON audit_log (target, at)")


def _m15_districts(conn: psycopg.Connection, timescale: bool) -> None:
    """Districts (区/县, county-level divisions of GB/T 2260): Jiangxi's hundred as a reference table
    (iotjx/db/districts.py names the source), and each site's district, which must lie in the site's
    city (its code's first four digits are the city's).  NULL: not known (unverified sites, catalogue
    sites imported without one) — such sites' meters count under "unknown district" of their city."""
    conn.execute("""
        CREATE TABLE IF NOT EXISTS districts (
            code integer PRIMARY KEY CHECK (mod(code, 100) <> 0),
            name_zh text NOT NULL,
            name_en text NOT NULL,
            city_code integer NOT NULL REFERENCES cities(code),
            CHECK (code / 100 = city_code / 100),
            UNIQUE (city_code, name_zh))""")
    with conn.cursor() as cur:
        cur.executemany("""INSERT INTO districts (code, name_zh, name_en, city_code) VALUES (%s, %s, %s, %s)
                           ON CONFLICT (code) DO UPDATE SET name_zh = excluded.name_zh, name_en = excluded.name_en,
                               city_code = excluded.city_code""",
                        [(code, zh, en, code // 100 * 100) for code, zh, en in DISTRICTS])
    conn.execute("ALTER TABLE sites ADD COLUMN IF NOT EXISTS district_code integer REFERENCES districts(code)")
    conn.execute("ALTER TABLE sites DROP CONSTRAINT IF EXISTS sites_district_in_city")
    conn.execute("ALTER TABLE sites ADD CONSTRAINT sites_district_in_city "
                 "CHECK (district_code IS NULL OR district_code / 100 = city_code / 100)")
    conn.execute("CREATE INDEX IF NOT EXISTS sites_district ON sites (district_code)")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "foundation: cities, sites, models, devices, raw log, rejects, water readings", _m1_foundation),
    Migration(2, "fire events, traffic flow, parking events, radio readings; envelope models", _m2_families),
    Migration(3, "uplink dedup keys", _m3_dedup),
    Migration(4, "CoAP device credentials (hashed); downlinks for sleeping devices", _m4_credentials_downlinks),
    Migration(5, "dedup window per device model", _m5_dedup_windows),
    Migration(6, "API keys and roles, the audit log, MQTT accounts", _m6_security),
    Migration(7, "largest uplink per device model; reject tally by source and minute", _m7_bounds),
    Migration(8, "site catalogue, model networks, device status history, progress entries, coverage snapshots",
              _m8_coverage),
    Migration(9, "fire alarm and fault lifecycles per component", _m9_fire_alarms),
    Migration(10, "water consumption per meter-day, night flow and leakage per site, per-meter alerts", _m10_water),
    Migration(11, "rollups per device-day, site-quarter-hour, lane-5-minutes, cell-day; integer device keys",
              _m11_rollups),
    Migration(12, "when each dedup key was claimed (replays keep their original receive times)", _m12_dedup_claimed_at),
    Migration(13, "re-decoded rejects marked (stored exactly once); keyset indexes of the alarm, alert and reject lists",
              _m13_redecode),
    Migration(14, "background jobs of the API (re-decode): state, counts, who, when; audit log by target",
              _m14_jobs),
    Migration(15, "districts (GB/T 2260 county-level divisions of Jiangxi); each site's district, within its city",
              _m15_districts),
)


def _choose_storage(conn: psycopg.Connection) -> str:
    """Record, once, whether this schema lives on TimescaleDB or plain PostgreSQL."""
    conn.execute("CREATE TABLE IF NOT EXISTS iotjx_meta (key text PRIMARY KEY, value text NOT NULL)")
    row = conn.execute("SELECT value FROM iotjx_meta WHERE key = 'storage'").fetchone()
    if row:
        return row[0]
    kind = "postgresql"
    if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
        try:
            with conn.transaction():
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                # The Apache-2 edition refuses compression and policies: plain PostgreSQL serves better.
                lic = conn.execute("SELECT current_setting('timescaledb.license', true)").fetchone()[0]
                if lic not in (None, "timescale"):
                    raise psycopg.errors.FeatureNotSupported(
                        f"timescaledb license {lic!r} lacks compression and policies")
            kind = "timescaledb"
        except psycopg.Error as exc:
            log.warning("timescaledb is installed but cannot be created (%s); using plain PostgreSQL", exc)
    conn.execute("INSERT INTO iotjx_meta (key, value) VALUES ('storage', %s)", (kind,))
    return kind


def upgrade(url: str, raw_retention_days: int = 30) -> dict[str, object]:
    """Apply every pending migration; returns the storage kind and the versions applied now."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        try:
            with conn.transaction():
                kind = _choose_storage(conn)
                conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                    version integer PRIMARY KEY, name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())""")
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            applied = []
            for m in MIGRATIONS:
                if m.version in done:
                    continue
                with conn.transaction():
                    m.apply(conn, kind == "timescaledb")
                    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name))
                applied.append(m.version)
                log.info("applied migration %d: %s", m.version, m.name)
            if kind == "timescaledb":
                _retention_policy(conn, raw_retention_days)
            today = datetime.now(UTC).date()
            ensure_partitions(conn, today - timedelta(days=1), today + timedelta(days=7))
            if kind == "postgresql":
                drop_expired_partitions(conn, raw_retention_days)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
    log.info("storage: %s (%s)", kind, "hypertables, compression by device, retention" if kind == "timescaledb"
             else "native range partitions by day")
    return {"storage": kind, "applied": applied, "version": MIGRATIONS[-1].version}


def _retention_policy(conn: psycopg.Connection, raw_retention_days: int) -> None:
    """The raw log's retention job, replaced only when its period changed (a job keeps its id and history)."""
    interval = f"{raw_retention_days} days"
    same = conn.execute("""
        SELECT 1 FROM timescaledb_information.jobs
        WHERE proc_name = 'policy_retention' AND hypertable_schema = current_schema()
          AND hypertable_name = 'raw_uplinks' AND (config->>'drop_after')::interval = %s::interval""",
                        (interval,)).fetchone()
    if not same:
        conn.execute("SELECT remove_retention_policy('raw_uplinks', if_exists => true)")
        conn.execute("SELECT add_retention_policy('raw_uplinks', %s::interval)", (interval,))


def ensure_partitions(conn: psycopg.Connection, first_day: date, last_day: date) -> int:
    """Create the daily partitions of every time table that cover [first_day, last_day]."""
    made = 0
    for table in TIME_TABLES:
        row = conn.execute("SELECT iotjx_ensure_day_partitions(%s, %s, %s)", (table, first_day, last_day)).fetchone()
        made += row[0] if row else 0
    return made


def drop_expired_partitions(conn: psycopg.Connection, raw_retention_days: int) -> int:
    """Plain-PostgreSQL retention for the raw-uplink log (TimescaleDB has its own policy)."""
    keep_from = datetime.now(UTC).date() - timedelta(days=raw_retention_days)
    row = conn.execute("SELECT iotjx_drop_day_partitions_before('raw_uplinks', %s)", (keep_from,)).fetchone()
    return row[0] if row else 0
