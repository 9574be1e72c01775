"""`iotjx simulate`, `iotjx record`, `iotjx replay`: the simulator commands, mounted on the iotjx CLI."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from iotjx.settings import get_settings

console = Console()


def _need_database(settings) -> None:
    if settings.database_url is None:
        console.print("[red]IOTJX_DATABASE_URL is not set[/]")
        raise typer.Exit(2)


def _register(settings, records, what: str, coap_devices: set[str] | frozenset = frozenset()) -> None:
    """Register devices (migrations and the model catalogue first: a fresh database works too), and give
    the CoAP devices their derived tokens (simulators.transports.coap_token) as the gateway wants."""
    from iotjx.db import connect
    from iotjx.devices import RegistrationError, register_devices
    from iotjx.runtime import prepare_database

    prepare_database(settings)
    try:
        with connect(settings.database_url) as conn:
            result = register_devices(conn, list(records))
            if coap_devices:
                result["coap_tokens"] = _set_coap_tokens(conn, coap_devices)
    except RegistrationError as exc:
        console.print(f"[red]the {what} cannot be registered:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"registered the {what}: {result}")


def _set_coap_tokens(conn, device_ids) -> int:
    try:
        from ingest.coap import set_device_token       # where the gateway keeps CoAP credentials
    except ImportError:
        console.print("this iotjx has no CoAP ingest: no tokens set")
        return 0
    from simulators.transports import coap_token

    for device_id in sorted(device_ids):
        set_device_token(conn, device_id, coap_token(device_id))
    return len(device_ids)


def _targets(settings, coap_url: str | None, push_url: str | None, push_header: list[str] | None):
    from simulators.transports import Targets

    headers = []
    for h in push_header or []:
        name, sep, value = h.partition(":")
        if not sep:
            console.print(f"[red]--push-header {h!r}: use 'Name: value'[/]")
            raise typer.Exit(2)
        headers.append((name.strip(), value.strip()))
    return Targets.from_settings(settings, coap_url=coap_url, push_url=push_url, push_headers=tuple(headers))


def _speed(speed: float | None, as_fast: bool, default: float) -> float | None:
    if as_fast and speed is not None:
        console.print("[red]give --speed or --max, not both[/]")
        raise typer.Exit(2)
    return None if as_fast else (speed or default)


def _finish(summary) -> None:
    console.print(summary.table())
    for detail, n in summary.details.most_common(5):
        console.print(f"  {n} × {detail}")
    raise typer.Exit(0 if summary.total["failed"] == 0 else 1)


def simulate(
    scenario: Annotated[Optional[str], typer.Argument(help="a scenario name (see --list) or a TOML file; "
                                                         "none: the plain water fleet of --devices")] = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed (default: the scenario's)")] = None,
    speed: Annotated[Optional[float], typer.Option(min=0.0001, help="simulated seconds per real second "
                                                   "(default: the scenario's)")] = None,
    as_fast: Annotated[bool, typer.Option("--max", help="send as fast as the gateway takes it")] = False,
    scale: Annotated[float, typer.Option(min=0.0001, help="multiply every fleet's size")] = 1.0,
    duration: Annotated[Optional[str], typer.Option(help="simulated duration instead of the scenario's (2d, 6h)")] = None,
    capture: Annotated[Optional[Path], typer.Option(help="write every uplink to this capture (JSON lines; .gz)")] = None,
    register: Annotated[bool, typer.Option(help="register the fleet first (when IOTJX_DATABASE_URL is set)")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only write the capture; send nothing")] = False,
    inflight: Annotated[int, typer.Option(min=1, help="uplinks awaiting an answer at most")] = 256,
    coap_url: Annotated[Optional[str], typer.Option(help="CoAP server (default: IOTJX_COAP_BIND)")] = None,
    push_url: Annotated[Optional[str], typer.Option(help="carrier push URL, {carrier} = ctwing/onenet "
                                                    "(default: http://IOTJX_HTTP_PUSH_BIND/push/{carrier})")] = None,
    push_header: Annotated[Optional[list[str]], typer.Option(help="'Name: value' header on pushes")] = None,
    list_scenarios: Annotated[bool, typer.Option("--list", help="list the bundled scenarios")] = False,
    devices: Annotated[int, typer.Option(min=1, help="without a scenario: water meters")] = 100,
    interval: Annotated[float, typer.Option(min=0.01, help="without a scenario: seconds between rounds")] = 5.0,
    rounds: Annotated[int, typer.Option(min=1, help="without a scenario: uplinks per device")] = 1,
) -> None:
    """Run a scenario (a fleet over simulated time) into the gateway, or without one publish CJ/T 188
    uplinks from a plain water fleet over MQTT."""
    from simulators.scenario import ScenarioError, bundled_scenarios, load_scenario, parse_duration

    if list_scenarios:
        for name in bundled_scenarios():
            s = load_scenario(name)
            console.print(f"[bold]{name}[/] — {s.device_count:,} devices, {s.duration_s / 3600:g} h: {s.description}")
        return
    if scenario is None:
        _plain_water_fleet(devices, interval, rounds, register, seed if seed is not None else 1)
        return
    try:
        spec = load_scenario(scenario)
        if scale != 1.0:
            spec = spec.scaled(scale)
        if duration:
            spec = spec.with_duration(parse_duration(duration))
    except ScenarioError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    from simulators.capture import CaptureWriter
    from simulators.engine import Simulation

    settings = get_settings()
    sim = Simulation(spec, seed, onenet_token=settings.onenet_push_token)
    console.print(f"[bold]{spec.name}[/]: {len(sim.planned):,} devices, {spec.duration_s / 3600:g} h from "
                  f"{sim.header()['start']}, seed {sim.seed}")
    if dry_run and capture is None:
        console.print("[red]--dry-run writes only the capture: give --capture FILE[/]")
        raise typer.Exit(2)
    if register and not dry_run:
        if settings.database_url is None:
            console.print("IOTJX_DATABASE_URL is not set: the fleet is not registered (--no-register to silence)")
        else:
            _register(settings, sim.device_records, "scenario's fleet",
                      {p.record.device_id for p in sim.planned if p.transport == "coap"})
    writer = CaptureWriter(capture, sim.header()) if capture else None
    if writer is not None:
        for record in sim.device_records:
            writer.device(record)

    def recorded() -> Iterator:
        for record in sim.records():
            if writer is not None:
                writer.write(record)
            yield record

    try:
        if dry_run:
            n = sum(1 for _ in recorded())
            console.print(f"wrote {n:,} uplinks to {capture}; planted: {dict(sorted(sim.labels.items()))}")
            return
        from simulators.replay import send_records
        summary = send_records(recorded(), _targets(settings, coap_url, push_url, push_header),
                               speed=_speed(speed, as_fast, spec.speed), max_inflight=inflight, console=console,
                               description=spec.name, client_id=f"iotjx-sim-{sim.seed}")
    finally:
        if writer is not None:
            writer.close()
    if capture:
        console.print(f"capture: {capture} ({writer.count:,} uplinks)")
    console.print(f"planted: {dict(sorted(sim.labels.items()))}")
    _finish(summary)


def _plain_water_fleet(devices: int, interval: float, rounds: int, register: bool, seed: int) -> None:
    """The original `simulate`: CJ/T 188 uplinks from a water fleet over MQTT, round after round."""
    settings = get_settings()
    if settings.mqtt_url is None:
        console.print("[red]IOTJX_MQTT_URL is not set[/]")
        raise typer.Exit(2)
    from datetime import UTC, datetime

    from rich.progress import Progress
    from simulators.fleet import plan_water_fleet
    from simulators.publish import MqttPublisher
    from simulators.water import make_meters

    fleet = plan_water_fleet(devices, seed)
    if register:
        _need_database(settings)
        _register(settings, [d.record for d in fleet], "water fleet")
    host, port = settings.mqtt_host_port
    pub = MqttPublisher(host, port, prefix=settings.mqtt_topic_prefix, client_id=f"iotjx-sim-{seed}",
                        username=settings.mqtt_username, password=settings.mqtt_password)
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


def record(
    file: Annotated[Path, typer.Argument(help="capture file to write (JSON lines; .gz compresses)")],
    duration: Annotated[Optional[float], typer.Option(help="seconds to record; default: until Ctrl-C")] = None,
    count: Annotated[Optional[int], typer.Option(min=1, help="stop after this many uplinks")] = None,
    append: Annotated[bool, typer.Option(help="append to an existing capture")] = False,
) -> None:
    """Record the uplinks passing on the broker ({prefix}/up/+) into a capture, beside the gateways."""
    settings = get_settings()
    if settings.mqtt_url is None:
        console.print("[red]IOTJX_MQTT_URL is not set[/]")
        raise typer.Exit(2)
    from simulators.capture import WireRecorder

    recorder = WireRecorder(settings, file, append=append).start()
    if not recorder.wait_connected(15):
        recorder.stop()
        console.print(f"[red]no broker answered at {settings.mqtt_url}[/]")
        raise typer.Exit(1)
    console.print(f"recording {settings.mqtt_topic_prefix}/up/+ from {settings.mqtt_url} into {file}; Ctrl-C stops")
    started = time.monotonic()
    try:
        while (duration is None or time.monotonic() - started < duration) and (count is None or recorder.count < count):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    n = recorder.stop()
    console.print(f"recorded {n:,} uplinks in {time.monotonic() - started:.1f} s into {file}")


def replay(
    file: Annotated[Path, typer.Argument(help="a capture (from `simulate --capture` or `record`)")],
    speed: Annotated[Optional[float], typer.Option(min=0.0001, help="×N: recorded seconds per real second "
                                                   "(default: the capture's speed; 1 for wire captures)")] = None,
    as_fast: Annotated[bool, typer.Option("--max", help="as fast as the gateway takes it (bounded in flight)")] = False,
    inflight: Annotated[int, typer.Option(min=1, help="uplinks awaiting an answer at most")] = 256,
    register: Annotated[bool, typer.Option(help="register the capture's devices (when IOTJX_DATABASE_URL is set)")] = True,
    limit: Annotated[Optional[int], typer.Option(min=1, help="send only the first N uplinks")] = None,
    coap_url: Annotated[Optional[str], typer.Option(help="CoAP server (default: IOTJX_COAP_BIND)")] = None,
    push_url: Annotated[Optional[str], typer.Option(help="carrier push URL with {carrier}")] = None,
    push_header: Annotated[Optional[list[str]], typer.Option(help="'Name: value' header on pushes")] = None,
    original_times: Annotated[bool, typer.Option(
        "--original-times", help="send every uplink with its original receive time (the capture's `t`): MQTT and "
                                 "CoAP uplinks to {prefix}/replay/{device} over MQTT, pushes to the push URL with "
                                 "a header, as a tester account (IOTJX_MQTT_USERNAME/PASSWORD); the gateway "
                                 "(IOTJX_REPLAY_ENABLED) stores them as it did live")] = False,
) -> None:
    """Send a capture's uplinks again, each over its own transport (with --original-times: MQTT and CoAP
    uplinks over MQTT, each with its original receive time), with a progress bar and a summary."""
    from simulators.capture import read_capture
    from simulators.replay import send_records

    try:
        cap = read_capture(file)
    except (OSError, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    settings = get_settings()
    total, coap_devices = 0, set()
    for uplink in cap.uplinks():
        total += 1
        if uplink.transport == "coap":
            coap_devices.add(uplink.device_id)
    if register and cap.devices and settings.database_url is not None:
        _register(settings, cap.devices, f"capture's {len(cap.devices):,} devices", coap_devices)
    if limit is not None:
        total = min(total, limit)
    default_speed = float(cap.header.get("speed", 1.0)) if cap.header.get("source") == "simulator" else 1.0
    chosen = _speed(speed, as_fast, default_speed)
    if original_times and settings.mqtt_url is None:
        console.print("[red]--original-times sends over MQTT: IOTJX_MQTT_URL is not set[/]")
        raise typer.Exit(2)
    console.print(f"replaying {total:,} uplinks from {file} "
                  f"({'as fast as acknowledged' if chosen is None else f'×{chosen:g}'}"
                  f"{', with their original receive times' if original_times else ''})")
    summary = send_records(itertools.islice(cap.uplinks(), limit), _targets(settings, coap_url, push_url, push_header),
                           speed=chosen, max_inflight=inflight, total=total, console=console,
                           description=file.name, client_id=f"iotjx-replay-{int(time.time())}",
                           original_times=original_times)
    _finish(summary)


def register(app: typer.Typer, app_console: Console) -> None:
    """Add the simulator commands to the `iotjx` CLI."""
    global console
    console = app_console
    app.command()(simulate)
    app.command()(record)
    app.command()(replay)
