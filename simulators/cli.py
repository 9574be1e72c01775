"""`iotjx simulate`, `iotjx record`, `iotjx replay`: the simulator commands, mounted on the iotjx CLI."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from iotjx.settings import get_settings

console = Console()


def _need_database(settings) -> None:
    if settings.database_url is None:
        console.print("[red]IOTJX_DATABASE_URL is not set[/]")
        raise typer.Exit(2)


def simulate(devices: Annotated[int, typer.Option(min=1)] = 100,
             interval: Annotated[float, typer.Option(min=0.01, help="seconds between rounds of uplinks")] = 5.0,
             rounds: Annotated[int, typer.Option(min=1, help="uplinks per device")] = 1,
             register: Annotated[bool, typer.Option(help="register the fleet first (needs IOTJX_DATABASE_URL)")] = True,
             seed: int = 1) -> None:
    """Publish CJ/T 188 uplinks from a simulated water fleet over MQTT."""
    settings = get_settings()
    if settings.mqtt_url is None:
        console.print("[red]IOTJX_MQTT_URL is not set[/]")
        raise typer.Exit(2)
    import time
    from datetime import UTC, datetime

    from rich.progress import Progress
    from simulators.fleet import plan_water_fleet
    from simulators.publish import MqttPublisher
    from simulators.water import make_meters

    fleet = plan_water_fleet(devices, seed)
    if register:
        _need_database(settings)
        from .db import connect
        from .devices import register_devices
        with connect(settings.database_url) as conn:
            console.print(register_devices(conn, [d.record for d in fleet]))
    host, port = settings.mqtt_host_port
    pub = MqttPublisher(host, port, prefix=settings.mqtt_topic_prefix, client_id=f"iotjx-sim-{seed}")
    meters = make_meters(fleet, seed)
    with Progress(console=console) as progress:
        task = progress.add_task("publishing", total=devices * rounds)
        for r in range(rounds):
            now = datetime.now(UTC)
            for m in meters:
                m.advance(now, interval)
                pub.publish(m.device_id, m.frame(now))
                progress.advance(task)
            if r + 1 < rounds:
                time.sleep(interval)
    ok = pub.flush(60)
    pub.close()
    console.print(f"sent {pub.stats.sent}, acknowledged by the broker {pub.stats.acknowledged}, failed {pub.stats.failed}")
    raise typer.Exit(0 if ok and pub.stats.failed == 0 else 1)



def register(app: typer.Typer, app_console: Console) -> None:
    """Add the simulator commands to the `iotjx` CLI."""
    global console
    console = app_console
    app.command()(simulate)
