"""`iotjx demo`: the whole system on one machine — database, broker, gateway (MQTT, CoAP, carrier push),
API — and the province mix at a small scale (water, fire, traffic and parking across the eleven cities, a
simulated day played in the run), then coverage, open alarms, leaks, weak-coverage cells on screen and
the HTML coverage report written."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
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


def run_demo(settings: Settings, *, duration: float | None, devices: int, seed: int, corrupt: float,
             console: Console, html: str | None = None) -> int:
    """Run everything until `duration` seconds have passed (or Ctrl-C); 0 when data flowed and the report
    was written."""
    import uvicorn

    from analytics.coverage import compute_now
    from api.app import create_app
    from iotjx.coverage_view import report_view
    from ingest.gateway import Gateway

    from .db import connect, redact
    from .devices import bundled_models
    from .runtime import prepare_database, resolve_database
    from .targets import load_catalogue

    with ExitStack() as stack:
        fleet_login = {"username": settings.mqtt_username, "password": settings.mqtt_password}
        if settings.mqtt_url is None:
            settings, fleet_login = _demo_broker(settings, stack)
        settings = resolve_database(settings)
        settings = _with_all_transports(settings)
        summary = prepare_database(settings)
        console.print(f"[bold]database[/] {redact(settings.database_url)} — storage: {summary['storage']}, "
                      f"schema v{summary['version']}")
        console.print(f"[bold]broker[/]   {settings.mqtt_url} (MQTT {settings.mqtt_protocol})")

        sim, span = _province_mix(settings, devices, seed, corrupt)
        registered, left_out = _register(settings, sim)
        family = {m["model"]: m["family"] for m in bundled_models()}
        families = Counter(family.get(p.record.model, "other") for p in sim.planned)
        transports = Counter(p.transport for p in sim.planned)
        console.print(f"[bold]fleet[/]    province mix at a small scale: {registered} devices registered across 11 "
                      f"cities ({', '.join(f'{k} {v}' for k, v in sorted(families.items()))}; "
                      f"{', '.join(f'{k} {v}' for k, v in sorted(transports.items()))}); {left_out} left "
                      "unregistered (its uplinks are kept as unknown_device rejects)", highlight=False, soft_wrap=True)

        gateway = Gateway(settings)
        gateway.start()
        stack.callback(gateway.stop)
        if not gateway.mqtt.wait_connected(15):
            console.print("[red]the gateway could not connect to the broker[/]")
            return 1
        console.print(f"[bold]gateway[/]  MQTT, CoAP coap://127.0.0.1:{gateway.coap.port}, carrier push "
                      f"http://127.0.0.1:{gateway.http.port}/push/{{ctwing,onenet}}", highlight=False)

        host, port = _api_port(settings)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning"))
        api_thread = threading.Thread(target=server.run, name="iotjx-api", daemon=True)
        api_thread.start()
        stack.callback(api_thread.join, 10)
        stack.callback(setattr, server, "should_exit", True)
        api_key = _demo_key(settings, stack)
        console.print(f"[bold]api[/]      http://{host}:{port}/coverage  ·  /reports/coverage  ·  /docs  ·  /health — "
                      f"with the header `Authorization: Bearer {api_key}` (an admin key for this run, revoked when "
                      "it ends)", highlight=False, markup=True)

        # The simulated days are played in about 60 % of the run (the rest: the last batches, the analytics, the
        # report); without --duration at the scenario's own pace, then the demo waits for Ctrl-C.
        speed = span / max(duration * 0.6, 5.0) if duration is not None else sim.scenario.speed
        stop = threading.Event()
        answers: Counter = Counter()
        sender = threading.Thread(target=_send, name="iotjx-fleet", daemon=True,
                                  args=(sim, settings, fleet_login, gateway, speed, stop, answers))
        sender.start()
        stack.callback(sender.join, 30)
        stack.callback(stop.set)

        catalogue = load_catalogue(settings.targets_file)
        started = time.monotonic()
        with connect(settings.database_url, autocommit=True) as conn:
            def status_table() -> Table:
                stored, rejects = conn.execute(
                    "SELECT (SELECT count(*) FROM raw_uplinks WHERE outcome = 'stored'), "
                    "(SELECT count(*) FROM rejected_uplinks)").fetchone()
                t = Table(title=f"iotjx demo — {time.monotonic() - started:.0f} s, ×{speed:,.0f} simulated time",
                          show_header=True)
                for col in ("MQTT", "CoAP", "carrier push", "stored uplinks", "rejected", "queue", "broker"):
                    t.add_column(col, justify="right")
                t.add_row(*(_answered(answers, tr) for tr in ("mqtt", "coap", "http")), str(stored), str(rejects),
                          str(gateway.pipeline.queue_depth),
                          "connected" if gateway.mqtt.connected.is_set() else "[red]down[/]")
                return t

            try:
                with Live(status_table(), console=console, refresh_per_second=2, transient=False) as live:
                    while (duration is None and (sender.is_alive() or not stop.is_set())) or (
                            duration is not None and time.monotonic() - started < duration and sender.is_alive()):
                        time.sleep(0.5)
                        live.update(status_table())
            except KeyboardInterrupt:
                console.print("stopping…")
            stop.set()
            sender.join(30)
            time.sleep(settings.batch_age_ms / 1000 + 0.5)
            _analytics(settings)
            report = compute_now(conn, catalogue, live_factor=settings.live_factor, tz=settings.tz)
            console.print(report_view(report))
            live_n, registered_n = (sum(r["live"] for r in report.breakdown),
                                    sum(r["registered"] for r in report.breakdown))
            stored = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in READINGS}
            reasons = conn.execute("SELECT reason, count(*) FROM rejected_uplinks GROUP BY 1 ORDER BY 1").fetchall()
            _print_findings(conn, settings, console)
            path = _write_report(conn, report, settings, html)
        console.print(f"live devices: {live_n} of {registered_n} registered")
        console.print("stored " + ", ".join(f"{n} {t}" for t, n in stored.items()) + f" — {sum(stored.values())} "
                      "readings; rejects kept with their reason: " + (", ".join(f"{r} {n}" for r, n in reasons) or "none"),
                      soft_wrap=True)
        console.print(f"coverage report (HTML): {path}", highlight=False, soft_wrap=True)
        return 0 if sum(stored.values()) > 0 and live_n > 0 else 1


READINGS = ("water_readings", "fire_events", "traffic_flow", "parking_events", "radio_readings")
_SPAN_S = 2 * 86400.0             # the simulated days the demo plays: two nights of water for the night flow


def _with_all_transports(settings: Settings) -> Settings:
    """CoAP and carrier push on in the gateway (on a spare local port unless configured), with push tokens
    made for this run when none are set; OneNET's freshness check off, since the demo's pushes carry the
    simulated day's platform times."""
    import secrets

    update: dict = {"onenet_push_max_age_s": 0}
    if not settings.coap_enabled:
        update.update(coap_enabled=True, coap_bind="127.0.0.1:0")
    if not settings.http_push_enabled:
        update.update(http_push_enabled=True, http_push_bind="127.0.0.1:0")
    if settings.ctwing_push_token is None:
        update["ctwing_push_token"] = secrets.token_urlsafe(18)
    if settings.onenet_push_token is None:
        update["onenet_push_token"] = secrets.token_urlsafe(12)
    return settings.model_copy(update=update)


def _province_mix(settings: Settings, devices: int, seed: int, corrupt: float):
    """The province-mix scenario scaled to about `devices` devices, its two days ending now (livelier: `_livelier`)."""
    from dataclasses import replace

    from simulators.engine import Simulation
    from simulators.scenario import load_scenario

    base = load_scenario("province-mix")
    spec = base.scaled(max(devices / base.device_count, 0.0001))
    fleets = tuple(replace(f, behaviour=replace(f.behaviour, corrupt=corrupt), options=_livelier(f))
                   for f in spec.fleets)
    spec = replace(spec, fleets=fleets, start=time.time() - _SPAN_S, duration_s=_SPAN_S)
    return Simulation(spec, seed, onenet_token=settings.onenet_push_token), _SPAN_S


def _livelier(fleet) -> dict:
    """A demo day has more happening than a real one, so that a fleet of a few dozen devices shows some:
    a leak behind one water meter in seven, a fire alarm every other day per detector; CJ/T 188 meters send
    their hourly freeze records with each daily report (the night flow needs hours)."""
    options = dict(fleet.options)
    if fleet.family == "water":
        options["leak"] = max(options.get("leak", 0.0), 0.15)
        if (fleet.model.inner_codec or fleet.model.codec).startswith("cjt188"):
            options["freeze_hours"] = 24
    if "alarm_per_day" in options:
        options["alarm_per_day"] = max(options["alarm_per_day"], 0.5)
    return options


def _register(settings: Settings, sim) -> tuple[int, int]:
    """Register the fleet (and the sample site catalogue: plan targets count its sites) with the CoAP
    devices' tokens — all but one MQTT device, whose uplinks then show what an unregistered device gets."""
    from ingest.coap import set_device_token
    from simulators.transports import coap_token

    from .db import connect
    from .devices import register_devices
    from .sites import import_sites, load_sample_sites

    left_out = next((p.record.device_id for p in sim.planned if p.transport == "mqtt"), None)
    records = [p.record for p in sim.planned if p.record.device_id != left_out]
    with connect(settings.database_url) as conn:
        import_sites(conn, load_sample_sites())
        register_devices(conn, records)
        for p in sim.planned:
            if p.transport == "coap" and p.record.device_id != left_out:
                set_device_token(conn, p.record.device_id, coap_token(p.record.device_id))
    return len(records), int(left_out is not None)


def _send(sim, settings: Settings, login: dict, gateway, speed: float, stop: threading.Event, answers: Counter) -> None:
    """Play the simulation into the gateway over each device's transport, paced at `speed`, until done or
    `stop`; counts the answers per transport and outcome."""
    from dataclasses import replace

    from simulators.replay import send_records
    from simulators.transports import Targets

    targets = Targets.from_settings(settings, coap_url=f"coap://127.0.0.1:{gateway.coap.port}",
                                    push_url=f"http://127.0.0.1:{gateway.http.port}/push/{{carrier}}")
    targets = replace(targets, mqtt_username=login.get("username"), mqtt_password=login.get("password"))

    def records():
        for r in sim.records():
            if stop.is_set():
                return
            yield r

    def counted(record, answer) -> None:
        answers[(record.transport, answer.status)] += 1

    try:
        send_records(records(), targets, speed=speed, max_inflight=64, client_id=f"iotjx-demo-fleet-{sim.seed}",
                     on_answer=counted)
    except Exception:          # shown in the status table as nothing more answered; the demo goes on
        log.exception("the simulated fleet stopped")


def _answered(answers: Counter, transport: str) -> str:
    ok = answers[(transport, "acknowledged")]
    bad = answers[(transport, "refused")] + answers[(transport, "failed")]
    return f"{ok}" + (f" [yellow](+{bad} refused)[/]" if bad else "")


def _analytics(settings: Settings) -> None:
    """One round of the scheduled analytics' fire and water steps (alarm lifecycles, meter alerts), as the
    API's loop would run them."""
    from analytics.schedule import run_round

    from .db import connect

    result = run_round(lambda: connect(settings.database_url), settings, steps=("fire", "water"), wait=True)
    for step in result.steps:
        if step.error:
            log.warning("analytics step %s failed: %s", step.name, step.error)


def _print_findings(conn, settings: Settings, console: Console) -> None:
    """Open fire alarms, water leaks and weak-coverage cells, as an operator would look for them first."""
    from datetime import timedelta

    from analytics.fire import open_alarms
    from analytics.radio import radio_summary
    from analytics.water import open_alerts, site_nights

    names = dict(conn.execute("SELECT code, name_en FROM cities").fetchall())
    alarms = open_alarms(conn)
    t = Table(title=f"Open fire alarms and faults: {len(alarms)}")
    for col in ("alarm", "device", "city", "site", "kind", "state", "raised"):
        t.add_column(col)
    for a in alarms[:10]:
        t.add_row(str(a.alarm_id), a.device_id, names.get(a.city_code, "—"), a.site_name or "—", a.kind, a.state,
                  a.raised_at.astimezone(settings.tz).strftime("%m-%d %H:%M"))
    console.print(t)
    leaks = [a for a in open_alerts(conn) if a.kind in ("continuous_flow", "reverse_flow")]
    t = Table(title=f"Water leaks — meters with continuous or reverse flow: {len(leaks)}")
    for col in ("device", "city", "site", "kind", "since", "detail"):
        t.add_column(col)
    for a in leaks[:10]:
        t.add_row(a.device_id, names.get(a.city_code, "—"), a.site_name or "—", a.kind,
                  a.opened_at.astimezone(settings.tz).strftime("%m-%d %H:%M"), a.detail)
    console.print(t)
    nights = site_nights(conn, datetime.now(settings.tz).date(), limit=5)
    t = Table(title="Sites by night flow (minimum night flow, the leakage indicator; README \"Water\")")
    for col in ("site", "city", "night", "MNF m³/h", "meters", "leakage m³/h"):
        t.add_column(col)
    for n in nights:
        t.add_row(n.site_name, names.get(n.city_code, "—"), str(n.day), f"{n.mnf_m3h:.3f}", str(n.meters),
                  "—" if n.leakage_m3h is None else f"{n.leakage_m3h:.3f}")
    console.print(t)
    since = datetime.now(UTC) - timedelta(days=7)
    groups = radio_summary(conn, since, rsrp_min_dbm=settings.radio_rsrp_min_dbm,
                           sinr_min_db=settings.radio_sinr_min_db)
    cells = [g for g in groups if g.level == "cell" and g.weak > 0]
    weak = sum(g.weak for g in groups if g.level == "province")
    cells.sort(key=lambda g: (g.coverage_rate if g.coverage_rate is not None else 1.0, -g.weak))
    t = Table(title=f"Weak-coverage cells (a device below RSRP {settings.radio_rsrp_min_dbm:g} dBm or SINR "
                    f"{settings.radio_sinr_min_db:g} dB): {len(cells)}")
    for col in ("city", "cell", "devices with radio", "weak", "coverage", "RSRP p50"):
        t.add_column(col)
    for g in cells[:10]:
        t.add_row(g.city, str(g.cell_id), str(g.with_radio), str(g.weak),
                  "—" if g.coverage_rate is None else f"{100 * g.coverage_rate:.0f} %",
                  "—" if g.rsrp_p50 is None else f"{g.rsrp_p50:.0f} dBm")
    console.print(t)
    console.print(f"weak-coverage devices: {weak}, of which {weak - sum(g.weak for g in cells)} reported no cell id "
                  "(`iotjx report radio` lists them)", soft_wrap=True)
    sites = sorted((g for g in groups if g.level == "site" and g.weak > 0), key=lambda g: (-g.weak, g.site_name or ""))
    t = Table(title=f"Sites with weak-coverage devices: {len(sites)}")
    for col in ("city", "site", "devices with radio", "weak", "RSRP p10", "SINR p10"):
        t.add_column(col)
    for g in sites[:10]:
        t.add_row(g.city, g.site_name or "—", str(g.with_radio), str(g.weak),
                  "—" if g.rsrp_p10 is None else f"{g.rsrp_p10:.0f} dBm",
                  "—" if g.sinr_p10 is None else f"{g.sinr_p10:.0f} dB")
    console.print(t)


def _write_report(conn, report, settings: Settings, html: str | None) -> str:
    from pathlib import Path

    from analytics.report_html import render_report

    path = Path(html) if html else Path(settings.data_dir) / "coverage-report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(conn, report, settings), encoding="utf-8")
    return str(path.resolve())


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
