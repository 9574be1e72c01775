"""`iotjx demo`: the main job on one machine — database, broker, gateway, API and a simulated water
fleet across the eleven cities, with readings arriving and the coverage report on screen."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .settings import Settings, bind_address

log = logging.getLogger(__name__)


def _api_port(settings: Settings) -> tuple[str, int]:
    host, port = bind_address(settings.api_bind)
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            s.bind((host, 0))
            port = s.getsockname()[1]
    return host, port


def run_demo(settings: Settings, *, duration: float | None, devices: int, interval: float, seed: int,
             corrupt: float, console: Console) -> int:
    """Run everything until `duration` seconds have passed (or Ctrl-C); 0 when data flowed."""
    import uvicorn

    from analytics.coverage import compute_now
    from api.app import create_app
    from iotjx.coverage_view import report_view
    from ingest.gateway import Gateway
    from simulators.fleet import plan_water_fleet
    from simulators.publish import MqttPublisher
    from simulators.water import make_meters

    from .db import connect, redact
    from .devices import register_devices
    from .sites import import_sites, load_sample_sites
    from .runtime import prepare_database, resolve_database
    from .targets import load_catalogue

    with ExitStack() as stack:
        fleet_login = {"username": settings.mqtt_username, "password": settings.mqtt_password}
        if settings.mqtt_url is None:
            settings, fleet_login = _demo_broker(settings, stack)
        settings = resolve_database(settings)
        summary = prepare_database(settings)
        console.print(f"[bold]database[/] {redact(settings.database_url)} — storage: {summary['storage']}, "
                      f"schema v{summary['version']}")
        console.print(f"[bold]broker[/]   {settings.mqtt_url} (MQTT {settings.mqtt_protocol})")

        fleet = plan_water_fleet(devices, seed, reporting_interval_s=max(10, int(interval * 5)))
        with connect(settings.database_url) as conn:
            # The sample site catalogue (the programme office imports the official one): plan targets
            # count its sites; two of the fleet's communities are its model communities (by alias).
            sites = import_sites(conn, load_sample_sites())
            reg = register_devices(conn, [d.record for d in fleet])
        console.print(f"[bold]sites[/]    the sample site catalogue: {sites}")
        console.print(f"[bold]fleet[/]    {devices} water meters registered across 11 cities ({reg})")

        gateway = Gateway(settings)
        gateway.start()
        stack.callback(gateway.stop)
        if not gateway.mqtt.wait_connected(15):
            console.print("[red]the gateway could not connect to the broker[/]")
            return 1

        host, port = _api_port(settings)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning"))
        api_thread = threading.Thread(target=server.run, name="iotjx-api", daemon=True)
        api_thread.start()
        stack.callback(api_thread.join, 10)
        stack.callback(setattr, server, "should_exit", True)
        api_key = _demo_key(settings, stack)
        console.print(f"[bold]api[/]      http://{host}:{port}/coverage  ·  /docs  ·  /health — with the header "
                      f"`Authorization: Bearer {api_key}` (an admin key for this run, revoked when it ends)",
                      highlight=False, markup=True)

        mqtt_host, mqtt_port = settings.mqtt_host_port
        publisher = MqttPublisher(mqtt_host, mqtt_port, prefix=settings.mqtt_topic_prefix,
                                  client_id=f"iotjx-demo-fleet-{seed}", **fleet_login)
        stack.callback(publisher.close)
        meters = make_meters(fleet, seed)
        stop = threading.Event()
        rng = random.Random(seed)

        def fleet_loop() -> None:
            last = datetime.now(UTC)
            while not stop.is_set():
                now = datetime.now(UTC)
                for m in meters:
                    m.advance(last, (now - last).total_seconds() * 3600)   # an hour of use per second
                    frame = m.frame(now)
                    if rng.random() < corrupt:
                        frame = frame[:-2] + bytes([frame[-2] ^ 0x5A, 0x16])   # a bad checksum, as on a noisy link
                    publisher.publish(m.device_id, frame)
                if rng.random() < 0.2:
                    publisher.publish("869999000000000", meters[0].frame(now))   # nobody registered this one
                last = now
                stop.wait(interval)

        sim = threading.Thread(target=fleet_loop, name="iotjx-fleet", daemon=True)
        sim.start()
        stack.callback(sim.join, 10)
        stack.callback(stop.set)

        catalogue = load_catalogue(settings.targets_file)
        started = time.monotonic()
        with connect(settings.database_url, autocommit=True) as conn:
            def status_table() -> Table:
                readings, rejects = conn.execute(
                    "SELECT (SELECT count(*) FROM water_readings), (SELECT count(*) FROM rejected_uplinks)").fetchone()
                t = Table(title=f"iotjx demo — {time.monotonic() - started:.0f} s", show_header=True)
                for col in ("published", "acked by broker", "stored readings", "rejected", "queue", "broker"):
                    t.add_column(col, justify="right")
                t.add_row(str(publisher.stats.sent), str(publisher.stats.acknowledged), str(readings), str(rejects),
                          str(gateway.pipeline.queue_depth),
                          "connected" if gateway.mqtt.connected.is_set() else "[red]down[/]")
                return t

            try:
                with Live(status_table(), console=console, refresh_per_second=2, transient=False) as live:
                    while duration is None or time.monotonic() - started < duration:
                        time.sleep(0.5)
                        live.update(status_table())
            except KeyboardInterrupt:
                console.print("stopping…")
            stop.set()
            sim.join(10)
            publisher.flush(15)
            time.sleep(settings.batch_age_ms / 1000 + 0.5)
            report = compute_now(conn, catalogue, live_factor=settings.live_factor, tz=settings.tz)
            console.print(report_view(report))
            live, registered = sum(r["live"] for r in report.breakdown), sum(r["registered"] for r in report.breakdown)
            stored = conn.execute("SELECT count(*) FROM water_readings").fetchone()[0]
            reasons = conn.execute("SELECT reason, count(*) FROM rejected_uplinks GROUP BY 1 ORDER BY 1").fetchall()
        console.print(f"live devices: {live} of {registered} registered")
        console.print(f"stored {stored} readings; rejects kept with their reason: "
                      + (", ".join(f"{r} {n}" for r, n in reasons) or "none"))
        return 0 if stored > 0 and live > 0 else 1


def _demo_broker(settings: Settings, stack: ExitStack) -> tuple[Settings, dict]:
    """A broker for the demo: Mosquitto with the deploy configuration and accounts it makes itself
    (the gateway logs in as its gateway, the simulated fleet as its tester), or, without Mosquitto,
    the embedded amqtt broker — anonymous, with a warning."""
    import shutil
    from pathlib import Path

    from .broker import AmqttBroker, MosquittoProcess

    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        broker = MosquittoProcess(Path(settings.data_dir).resolve() / "mosquitto").start()
        stack.callback(broker.stop)
        log.info("no IOTJX_MQTT_URL: started mosquitto with deploy/mosquitto/mosquitto.conf (devices on %s, "
                 "services on %s)", broker.device_url, broker.url)
        return settings.model_copy(update=broker.gateway_settings()), dict(broker.tester_login)
    broker = AmqttBroker().start()
    stack.callback(broker.stop)
    return settings.model_copy(update={"mqtt_url": broker.url, "mqtt_protocol": "3.1.1"}), {}


def _demo_key(settings: Settings, stack: ExitStack) -> str:
    """An admin API key for the person watching the demo, audited, and revoked when the demo stops."""
    from . import audit
    from .apikeys import create_key, revoke_key
    from .db import connect

    actor = audit.cli_actor()
    with connect(settings.database_url) as conn:
        key, secret = create_key(conn, "admin", name="iotjx demo", created_by=actor)
        audit.record(conn, actor=actor, method="demo", route="iotjx demo", target=key.key_id,
                     change={"role": key.role, "name": key.name})

    def revoke() -> None:
        with connect(settings.database_url) as conn:
            if revoke_key(conn, key.key_id) is not None:
                audit.record(conn, actor=actor, method="demo", route="iotjx demo", target=key.key_id,
                             change={"revoked": True})

    stack.callback(revoke)
    return secret
