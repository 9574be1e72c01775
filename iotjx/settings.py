"""One typed settings object, read once from ``IOTJX_*`` environment variables."""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


_PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "change_me", "secret", "token", "placeholder", "xxx", "test"}


class Settings(BaseSettings):
    """Every knob of iotjx; the README's settings table is generated from these descriptions."""

    model_config = SettingsConfigDict(env_prefix="IOTJX_", env_file=None, extra="ignore")

    database_url: str | None = Field(
        None, description="PostgreSQL/TimescaleDB URL; unset: `iotjx demo` starts an embedded PostgreSQL")
    mqtt_url: str | None = Field(
        None, description="Broker URL `mqtt://host:port`; unset: the demo uses `mosquitto` on PATH or an embedded amqtt broker")
    mqtt_protocol: str = Field(
        "3.1.1", description="MQTT protocol of the gateway's client: `3.1.1` (paho handles it ~1.4 x faster) or `5`")
    mqtt_client_id: str = Field(
        "iotjx-gateway-1", description="This gateway's name: its row in `gateway_status` and `/health`, its spool directory; "
                                       "its MQTT client id is derived from it (see `IOTJX_MQTT_SESSION_SECRET`)")
    mqtt_topic_prefix: str = Field("iotjx", description="Uplinks on `{prefix}/up/{device_id}`, downlinks on `{prefix}/down/{device_id}`")
    mqtt_shared_group: str | None = Field(
        None, description="When set, subscribe as `$share/{group}/…` so replicas split one stream (Mosquitto 2 and EMQX take it over 3.1.1 too)")
    mqtt_username: str | None = Field(None, description="Broker user name")
    mqtt_password: str | None = Field(None, description="Broker password")
    # Device identity on MQTT (iotjx/broker_sync.py, docs/broker-security.md)
    mqtt_session_secret: str | None = Field(
        None, description="Key (HMAC-SHA256) from which the gateway's MQTT client id and shared-subscription group are "
                          "derived, so that nobody can guess them and take its session or its share; unset: "
                          "`IOTJX_MQTT_PASSWORD`; neither: the names as configured")
    mqtt_identity_property: str | None = Field(
        None, description="MQTT 5 user property in which the broker passes the publisher's authenticated user name (e.g. "
                          "added by EMQX); set: an uplink or ack whose topic names another device is refused (kept as a "
                          "reject). Needs `IOTJX_MQTT_PROTOCOL=5`")
    broker_conf_dir: Path = Field(
        Path("/etc/mosquitto/iotjx"), description="Where `iotjx broker sync` writes Mosquitto's password files and ACLs")
    coap_bind: str = Field("0.0.0.0:5683", description="CoAP listen address")
    api_bind: str = Field("127.0.0.1:8000", description="HTTP API listen address")
    batch_size: int = Field(5000, ge=1, le=1_000_000, description="Uplinks per write batch (at most)")
    batch_age_ms: int = Field(200, ge=1, description="A batch is written when its oldest uplink is this old")
    batch_idle_ms: float = Field(
        5, ge=0, description="…or when no uplink arrived for this long (devices waiting for their answer); 0: only size and age")
    queue_max: int = Field(50_000, ge=1, description="Uplinks held in memory; a full queue stops reading from the transport")
    db_writers: int | None = Field(
        None, ge=1, le=8, description="Database connections writing batches side by side (one batch is built while another waits on PostgreSQL); unset: 2, or 1 for each replica on a shared subscription, whose writers share the database")
    registry_cache_max: int = Field(
        200_000, ge=1, description="Devices the gateway keeps cached (least recently seen leave first; ~350 bytes each)")
    spool_dir: Path | None = Field(
        None, description="The gateway's durable spool for when the database is away or slow; unset: `{data_dir}/spool/{mqtt_client_id}`")
    spool_max_bytes: int = Field(
        1 << 30, ge=1 << 20, description="Spool size limit; past it the gateway stops acknowledging (backpressure) instead of dropping")
    slow_batch_s: float = Field(
        10.0, gt=0, description="A batch waiting this long on the database sends the batches behind it to the spool")
    dedup_window_s: float = Field(
        86400, ge=0, description="An uplink whose device and payload match one stored within this window is a duplicate")
    live_factor: float = Field(
        1.5, gt=0, description="A device is live when its last uplink is within live_factor × its reporting interval")
    raw_retention_days: int = Field(30, ge=1, description="Days the raw-uplink log keeps original bytes")
    data_dir: Path = Field(Path(".iotjx"), description="Where the demo keeps its embedded database and broker files")
    targets_file: Path | None = Field(None, description="Targets catalogue (TOML); unset: the bundled one")
    timezone: str = Field(
        "Asia/Shanghai", description="Local time of days, snapshots and rollups (a Jiangxi day); an IANA zone name")
    rollups: bool = Field(
        True, description="Keep the rollup tables (README \"Rollups\") in each batch's transaction; false only to "
                          "measure what they cost (benchmarks/ingest_e2e.py --no-rollups): the figures that read "
                          "them then miss what was written meanwhile")
    # Coverage (analytics/coverage.py, README "Coverage")
    coverage_refresh_s: float = Field(
        30, ge=0, description="`/coverage` answers from a report recomputed in one pass this often (its `generated_at` "
                              "says when); 0: recomputed for every request (small fleets, tests)")
    coverage_snapshot_delay_s: float = Field(
        3600, ge=0, description="A day's coverage snapshot is taken this long after the day ends (uplinks spooled "
                                "across midnight arrive first); missed days are filled from the stored uplinks")
    # Radio coverage (analytics/radio.py, docs/radio.md)
    radio_rsrp_min_dbm: float = Field(
        -105.0, ge=-156, le=-44, description="Radio coverage: a device is covered when its latest RSRP is at least this "
                                             "(dBm) and its SINR at least `IOTJX_RADIO_SINR_MIN_DB`; below either it is weak")
    radio_sinr_min_db: float = Field(
        -3.0, ge=-30, le=40, description="Radio coverage: the SINR (dB) a covered device has at least")
    # Scheduled analytics (analytics/schedule.py, README "Scheduled analytics")
    analytics_interval_s: float = Field(
        60, ge=0, description="The API runs the scheduled analytics (fire alarm lifecycles, water figures, coverage "
                              "snapshots) this often; with several replicas one runs a round and the others skip it; "
                              "0: off (run `iotjx analytics run` instead)")
    # Analytics thresholds.  A water threshold changed applies to what is computed from then on: run
    # `iotjx analytics run --once --full` to recompute the stored days and alerts with it.
    water_night_start_h: int = Field(
        2, ge=0, le=23, description="Minimum-night-flow window: first local hour (hourly slots from it)")
    water_night_end_h: int = Field(
        4, ge=1, le=24, description="Minimum-night-flow window: local hour it ends (exclusive); after the start")
    water_leakage_days: int = Field(
        7, ge=1, le=366, description="Leakage: the percentile of the nightly minimum over this many nights (UKWIR: 7)")
    water_leakage_percentile: float = Field(
        0.2, gt=0, lt=1, description="Leakage: which percentile of the nightly minimum, as a fraction (UKWIR: 0.2)")
    water_stopped_days: int = Field(
        7, ge=1, le=90, description="A meter with its valve open and no consumption this many days is stopped (alert)")
    water_continuous_flow_h: float = Field(
        24, gt=0, le=24 * 7, description="Positive deltas (readings at most 90 min apart) this long open a "
                                         "continuous-flow alert (a leak behind the meter)")
    water_reverse_max_m3: float = Field(
        1.0, gt=0, description="A register decrease up to this on the same meter is reverse flow (alert); a larger "
                               "drop starts a new series (a reset or replacement)")
    water_new_meter_max_m3: float = Field(
        10.0, ge=0, description="A new series' first register counts as consumption up to this (a new meter counts "
                                "from zero); above it the series starts with no consumption")
    fire_offline_factor: float = Field(
        2.0, gt=0, description="A fire device is offline after this × its reporting (heartbeat) interval without an uplink")
    traffic_overstay_s: float = Field(
        4 * 3600, gt=0, description="A parking stay longer than this is an overstay")
    traffic_hold_factor: float = Field(
        2.0, gt=0, description="A parking sensor's last state holds for this × its reporting interval")
    traffic_speed_bands: dict[str, tuple[float, float, float, float]] | None = Field(
        None, description="Congestion grade speed bands as JSON `{\"arterial\": [40, 30, 20, 15], …}`: per road class "
                          "the falling lower edges (km/h) of smooth, basically smooth, light, moderate; unset: "
                          "GB/T 33171-2016's (analytics/traffic.py)")
    battery_smoke_low_mv: float = Field(
        2800, gt=0, description="A GB/T 26875 smoke detector's battery is low below this (mV)")
    battery_parking_low_mv: float = Field(
        3300, gt=0, description="A parking sensor's battery is low below this (mV), besides its own low bit")
    battery_low_pct: float = Field(
        20.0, gt=0, le=100, description="A carrier object model's `battery_pct` is low below this")
    log_level: str = Field("INFO", description="Python log level")
    # CoAP ingest (ingest/coap.py, docs/transports.md)
    coap_enabled: bool = Field(False, description="Serve `POST coap://HOST/up/{device_id}` in the gateway")
    coap_max_payload: int = Field(
        16384, ge=64, le=1_048_576, description="Largest CoAP uplink (after block-wise assembly); larger gets 4.13")
    coap_rcvbuf: int = Field(
        4 * 1024 * 1024, ge=65536, description="SO_RCVBUF of the CoAP socket, for bursts (capped by net.core.rmem_max)")
    coap_require_credential: bool = Field(
        True, description="Refuse (4.01) uplinks from registered devices that have no CoAP token set")
    coap_quarantine_unknown: bool = Field(
        True, description="Keep uplinks from unregistered device ids as `unknown_device` rejects (answer 4.04)")
    coap_empty_ack_delay_s: float = Field(
        1.5, gt=0, lt=2.0, description="How long a CON's ACK waits to carry the answer (commit) before an empty ACK "
                                       "and a separate response; below the devices' ACK_TIMEOUT (2 s)")
    # Carrier-platform HTTP push (ingest/http.py)
    http_push_enabled: bool = Field(False, description="Serve `POST /push/ctwing` and `/push/onenet` in the gateway")
    http_push_bind: str = Field("0.0.0.0:8081", description="Listen address of the carrier push endpoint")
    http_push_max_body: int = Field(65536, ge=256, description="Largest push body in bytes; larger gets 413")
    ctwing_push_token: str | None = Field(
        None, description="Token CTWing pushes must carry (header `X-Push-Token` or `?token=`); unset: endpoint off")
    onenet_push_token: str | None = Field(
        None, description="OneNET push token (msg_signature = base64(MD5(token+nonce+msg))); unset: endpoint off")
    onenet_push_max_age_s: float = Field(
        900, ge=0, description="OneNET pushes whose `msg.at` is further than this from now are refused (401); a nonce seen "
                               "within it is answered at the door (a duplicate once taken); 0: no freshness check (replaying captures in a test system)")
    replay_enabled: bool = Field(
        False, description="Also take `{prefix}/replay/{device_id}`: a tester's replays carrying each uplink's original "
                           "receive time (ingest/replay.py). Only on a broker whose ACL lets only tester accounts write there "
                           "(the files of `iotjx broker sync` do)")
    replay_max_ahead_s: float = Field(
        300, ge=0, le=86400, description="A replayed uplink's original receive time may be at most this far ahead of "
                                         "the gateway's clock (and not before 2000); else it is kept as a reject")
    http_push_answer_s: float = Field(
        20, gt=0, description="A push not committed (or spooled) within this long is answered 503 + Retry-After; "
                              "the platform's retry is a duplicate if it was stored meanwhile")
    # API request bounds (api/limits.py)
    api_max_body: int = Field(
        1 << 20, ge=1024, le=64 << 20, description="Largest API request body in bytes (JSON routes); larger gets 413")
    api_max_import_bytes: int = Field(
        32 << 20, ge=1024, le=1 << 30, description="Largest CSV body of `POST /devices/bulk` and `POST /sites/bulk` in bytes; larger gets 413")
    api_rate_per_s: float = Field(
        50, ge=0, le=1e6, description="Requests per second each API key may make, sustained (a token bucket per key, "
                                      "per API process; `/health` exempt); past it 429 + Retry-After; 0: no limit")
    api_rate_burst: int = Field(
        200, ge=1, le=1_000_000, description="Requests an API key may make in a burst (the bucket's size) before `IOTJX_API_RATE_PER_S` applies")
    api_cors_origins: str = Field(
        "", description="Origins (`https://grafana.example.org`, comma-separated) whose browser pages may call the API "
                        "(CORS); empty: none, no Access-Control-* headers are sent")
    # Downlinks for sleeping devices (ingest/downlink.py)
    downlink_ttl_s: int = Field(7 * 86400, ge=60, description="A queued command expires after this long by default")
    downlink_max_attempts: int = Field(
        1, ge=1, le=20, description="Deliveries of one command (on successive uplinks) while it is not acknowledged")
    downlink_poll_s: float = Field(
        2.0, gt=0, description="How often the gateway refreshes which devices have commands waiting, and expires old ones")

    # Bounds on what uplinks can cost the gateway (ingest/rejects.py, docs/ingest.md "Rejects").  The
    # ceiling is at least the models' default limit (16 KiB, decoders.models), and caps a model's larger one.
    uplink_max_bytes: int = Field(
        65536, ge=16384, le=1 << 20, description="Largest uplink any transport queues; larger is cut to its first KiB "
        "and kept as a `too_large` reject (size and digest in the detail). At least every model's max_payload_bytes, "
        "at most the broker's message_size_limit")
    queue_max_bytes: int = Field(
        64 << 20, ge=1 << 20, description="Payload bytes held in the gateway's queue (besides queue_max uplinks); "
        "a full queue stops reading from the transport")
    reject_rows_per_min: int = Field(
        60, ge=0, description="Reject rows kept per source (peer address, MQTT user name, else the transport), "
        "reason and minute; past it rejects are only counted in `reject_tally`; 0: no limit (a tester replaying a capture faster "
        "than real time)")
    reject_retention_days: int = Field(
        30, ge=1, description="Days `rejected_uplinks` and `reject_tally` keep their rows (purged hourly in chunks)")

    # Grafana (iotjx/grafana/, `iotjx grafana push`)
    grafana_url: str = Field("http://127.0.0.1:3000", description="Grafana that `iotjx grafana push` uploads the data source and boards to")
    grafana_token: str | None = Field(
        None, description="Grafana service-account token for `iotjx grafana push` (Editor or Admin); else `IOTJX_GRAFANA_USER`/`IOTJX_GRAFANA_PASSWORD`")
    grafana_user: str | None = Field(None, description="Grafana user for `iotjx grafana push` (basic auth), when no token is set")
    grafana_password: str | None = Field(None, description="…and its password")
    grafana_database_url: str | None = Field(
        None, description="The database as Grafana reaches it (a read-only role is enough), for the pushed data source; "
                          "unset: `IOTJX_DATABASE_URL`")

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {value!r} is not an IANA time zone such as Asia/Shanghai") from None
        return value

    @field_validator("mqtt_protocol")
    @classmethod
    def _protocol(cls, value: str) -> str:
        if value not in ("5", "3.1.1"):
            raise ValueError("mqtt_protocol must be '5' or '3.1.1'")
        return value

    @field_validator("ctwing_push_token", "onenet_push_token")
    @classmethod
    def _push_token(cls, value: str | None) -> str | None:
        # OneNET allows tokens of 3-32 characters, so length cannot be the test; placeholders can.
        if value is not None and value.strip().lower() in _PLACEHOLDER_SECRETS:
            raise ValueError("a placeholder push token is refused: set the token configured on the carrier platform")
        return value

    @model_validator(mode="after")
    def _identity_needs_v5(self) -> Settings:
        if self.mqtt_identity_property and self.mqtt_protocol != "5":
            raise ValueError("mqtt_identity_property needs mqtt_protocol 5 (user properties are MQTT 5)")
        return self

    @model_validator(mode="after")
    def _night_window(self) -> Settings:
        if self.water_night_end_h <= self.water_night_start_h:
            raise ValueError(f"water_night_end_h ({self.water_night_end_h}) must be after water_night_start_h "
                             f"({self.water_night_start_h}): the window is within one local night, e.g. 2 to 4")
        return self

    @field_validator("traffic_speed_bands")
    @classmethod
    def _speed_bands(cls, value: dict[str, tuple[float, float, float, float]] | None):
        if value is not None:
            for road_class, edges in value.items():
                if any(a <= b for a, b in zip(edges, edges[1:])) or edges[-1] <= 0:
                    raise ValueError(f"speed bands of {road_class!r} must be 4 falling positive lower edges (km/h), "
                                     f"not {list(edges)}")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
                raise ValueError("mqtt_url must look like mqtt://host:1883")
        return value

    @field_validator("api_cors_origins")
    @classmethod
    def _cors_origins(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",") if o.strip()):
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc
                                  or parts.path not in ("", "/") or parts.query or parts.fragment):
                raise ValueError(f"api_cors_origins: {origin!r} is not an origin such as https://grafana.example.org "
                                 "(scheme and host, optionally :port, nothing after)")
        return value

    @property
    def cors_origins(self) -> list[str]:
        """`api_cors_origins` as a list (empty: CORS off)."""
        return [o.strip().rstrip("/") for o in self.api_cors_origins.split(",") if o.strip()]

    @property
    def tz(self):
        """`timezone` as a ZoneInfo: the zone of days, snapshots and rollups."""
        from zoneinfo import ZoneInfo

        return ZoneInfo(self.timezone)

    @property
    def speed_bands(self) -> dict[str, tuple[float, ...]]:
        """The congestion grade's speed bands: the defaults with `traffic_speed_bands` over them."""
        from analytics.traffic import GRADE_SPEED_BANDS

        return {**GRADE_SPEED_BANDS, **(self.traffic_speed_bands or {})}

    @property
    def battery_thresholds(self) -> dict[str, float]:
        """The battery-low thresholds as `analytics.health.batteries` takes them."""
        return {"smoke_low_mv": self.battery_smoke_low_mv, "parking_low_mv": self.battery_parking_low_mv,
                "low_pct": self.battery_low_pct}

    @property
    def water_night_window(self) -> tuple[int, int]:
        """The minimum-night-flow window as local hours [start, end)."""
        return self.water_night_start_h, self.water_night_end_h

    @property
    def water_rules(self):
        """The water thresholds as `analytics.water.WaterRules`."""
        from analytics.water import WaterRules

        return WaterRules(reverse_max_m3=self.water_reverse_max_m3, new_meter_max_m3=self.water_new_meter_max_m3,
                          stopped_days=self.water_stopped_days, continuous_flow_s=self.water_continuous_flow_h * 3600,
                          leakage_days=self.water_leakage_days, leakage_percentile=self.water_leakage_percentile)

    @property
    def mqtt_host_port(self) -> tuple[str, int]:
        if self.mqtt_url is None:
            raise ValueError("no broker configured (IOTJX_MQTT_URL)")
        parts = urlsplit(self.mqtt_url)
        return parts.hostname or "127.0.0.1", parts.port or 1883

    @property
    def database_writers(self) -> int:
        """`db_writers`, or its default: 2 for a lone gateway; 1 for each replica of a shared
        subscription, where the processes already write side by side (measured on 2 cores: two
        replicas with 2 writers each stored ~10 % less than with 1 each; benchmarks/README.md)."""
        if self.db_writers is not None:
            return self.db_writers
        return 1 if self.mqtt_shared_group else 2

    @property
    def uplink_topic_filter(self) -> str:
        topic = f"{self.mqtt_topic_prefix}/up/+"
        return f"$share/{self.mqtt_share_group}/{topic}" if self.mqtt_shared_group else topic

    @property
    def replay_topic_filter(self) -> str:
        """The replay topic's filter (`replay_enabled`), shared like the uplinks' when they are."""
        topic = f"{self.mqtt_topic_prefix}/replay/+"
        return f"$share/{self.mqtt_share_group}/{topic}" if self.mqtt_shared_group else topic

    def _secret_name(self, kind: str, name: str) -> str:
        # Mosquitto checks neither a client id nor a subscription against its ACL file: whoever knows
        # the gateway's client id can take its session, whoever knows its group can join its share
        # (and have the broker drop that share).  Derived from a secret, neither can be guessed.
        key = self.mqtt_session_secret or self.mqtt_password
        if not key:
            return name
        tag = hmac.new(key.encode(), f"iotjx-mqtt-{kind}:{name}".encode(), hashlib.sha256).hexdigest()[:20]
        return f"{name}-{tag}"

    @property
    def mqtt_session_client_id(self) -> str:
        """The gateway's MQTT client id: `mqtt_client_id` plus an HMAC tag (stable across restarts)."""
        return self._secret_name("client", self.mqtt_client_id)

    @property
    def mqtt_share_group(self) -> str | None:
        """The shared-subscription group on the wire: `mqtt_shared_group` plus an HMAC tag, the same for
        every replica that has the same secret."""
        return self._secret_name("share", self.mqtt_shared_group) if self.mqtt_shared_group else None


def bind_address(value: str) -> tuple[str, int]:
    """`host:port` as a pair."""
    host, _, port = value.rpartition(":")
    return host or "0.0.0.0", int(port)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, validated once."""
    return Settings()
