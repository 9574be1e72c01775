"""Sending a stream of uplink records (a live simulation or a capture) at real speed, ×N, or as fast
as the server takes them (a bounded number in flight), with a progress bar and a summary."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .capture import UplinkRecord
from .transports import Answer, CoapChannel, HttpChannel, MqttChannel, Targets


@dataclass(slots=True)
class SendSummary:
    """What became of the records sent: per transport, and the first refusals' details."""

    sent: Counter[str] = field(default_factory=Counter)
    acknowledged: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    details: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    simulated_s: float = 0.0              # simulated (or recorded) time the records spanned

    def add(self, transport: str, answer: Answer) -> None:
        getattr(self, answer.status)[transport] += 1
        if answer.detail and len(self.details) < 20:
            self.details[answer.detail[:120]] += 1

    @property
    def total(self) -> dict[str, int]:
        return {k: sum(getattr(self, k).values()) for k in ("sent", "acknowledged", "refused", "failed")}

    @property
    def rate(self) -> float:
        """Acknowledged records per second of wall-clock time."""
        return self.total["acknowledged"] / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def table(self, title: str = "sent") -> Table:
        t = Table(title=title)
        for column in ("transport", "sent", "acknowledged", "refused", "failed"):
            t.add_column(column, justify="right" if column != "transport" else "left")
        for transport in sorted(self.sent):
            t.add_row(transport, *(str(getattr(self, k)[transport]) for k in ("sent", "acknowledged", "refused",
                                                                                "failed")))
        tot = self.total
        t.add_row("[bold]all[/]", *(f"[bold]{tot[k]}[/]" for k in ("sent", "acknowledged", "refused", "failed")))
        t.caption = (f"{self.elapsed_s:.1f} s, {self.rate:,.0f} acknowledged/s"
                     + (f"; {self.simulated_s / 3600:.1f} h of device time" if self.simulated_s else ""))
        return t


def send_records(records: Iterable[UplinkRecord], targets: Targets, *, speed: float | None = None,
                 max_inflight: int = 256, total: int | None = None, console: Console | None = None,
                 description: str = "sending", client_id: str = "iotjx-replay",
                 on_answer: Callable[[UplinkRecord, Answer], None] | None = None,
                 original_times: bool = False) -> SendSummary:
    """Send every record over its transport and wait for every answer.

    `original_times`: each record carries its original receive time (`record.t`) — MQTT and CoAP
    records over MQTT to the replay topic (with their transport), carrier pushes to the push URL
    with the time in a header (`ingest.replay`); the login (`targets.mqtt_username`) must be a
    tester account and the gateway must have IOTJX_REPLAY_ENABLED.  The gateway then stores each as
    the live run did — its dedup window, its readings' time — whatever the speed or the day.

    `speed`: simulated (recorded) seconds per real second — 1 is real time, 3600 an hour a second;
    None sends as fast as the server acknowledges, `max_inflight` at a time.  A progress bar is drawn on
    `console` when one is given."""
    if speed is not None and speed <= 0:
        raise ValueError("speed must be positive (or None: as fast as the server takes it)")
    return asyncio.run(_send_all(records, targets, speed, max(1, max_inflight), total, console, description,
                                 client_id, on_answer, original_times))


async def _send_all(records: Iterable[UplinkRecord], targets: Targets, speed: float | None, max_inflight: int,
                    total: int | None, console: Console | None, description: str, client_id: str,
                    on_answer: Callable[[UplinkRecord, Answer], None] | None,
                    original_times: bool = False) -> SendSummary:
    summary = SendSummary()
    channels: dict[str, MqttChannel | CoapChannel | HttpChannel] = {}
    slots = asyncio.Semaphore(max_inflight)
    pending: set[asyncio.Task] = set()
    loop = asyncio.get_running_loop()
    progress = _progress(console, description, total)
    task_id = progress.add_task(description, total=total, answers="") if progress else None
    started = time.monotonic()
    first_t = last_t = None

    async def channel(transport: str):
        if original_times and transport in ("mqtt", "coap"):
            if "replay" not in channels:
                channels["replay"] = await asyncio.to_thread(MqttChannel, targets, client_id, original_times=True)
            return channels["replay"]
        if original_times and transport == "http":
            if transport not in channels:
                channels[transport] = HttpChannel(targets, original_times=True)
            return channels[transport]
        if transport not in channels:
            if transport == "mqtt":
                channels[transport] = await asyncio.to_thread(MqttChannel, targets, client_id)
            elif transport == "coap":
                channels[transport] = CoapChannel(targets)
            elif transport == "http":
                channels[transport] = HttpChannel(targets)
            else:
                raise ValueError(f"unknown transport {transport!r} in the records (mqtt, coap, http)")
        return channels[transport]

    # With original times a device's carrier pushes go one after another (each after the previous one's
    # answer), as the platform sent them: pushes travel over parallel connections, and a retry that
    # overtook its first copy would be the copy stored (the dedup keeps the first to commit). MQTT and
    # CoAP records share one MQTT connection, in order.
    last_push: dict[str, asyncio.Task] = {}

    async def one(record: UplinkRecord, ch, before: asyncio.Task | None) -> None:
        try:
            if before is not None:
                await asyncio.wait([before])
            answer = await ch.send(record)
        except Exception as exc:  # a channel fault is this record's failure, not the run's end
            answer = Answer("failed", f"{type(exc).__name__}: {exc}")
        finally:
            slots.release()
            if last_push.get(record.device_id) is asyncio.current_task():
                del last_push[record.device_id]           # the device's last push so far: nothing waits on it
        summary.add(record.transport, answer)
        if on_answer is not None:
            on_answer(record, answer)
        if progress is not None:
            tot = summary.total
            progress.update(task_id, advance=1, answers=f"acked {tot['acknowledged']} · refused {tot['refused']}"
                                                        f" · failed {tot['failed']}")

    try:
        if progress is not None:
            progress.start()
        for record in records:
            if first_t is None:
                first_t = record.t
            last_t = record.t
            if speed is not None:
                delay = started + (record.t - first_t) / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            ch = await channel(record.transport)
            await slots.acquire()
            summary.sent[record.transport] += 1
            before = last_push.get(record.device_id) if original_times and record.transport == "http" else None
            task = loop.create_task(one(record, ch, before))
            if original_times and record.transport == "http":
                last_push[record.device_id] = task
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
    finally:
        for ch in channels.values():
            await ch.close()
        if progress is not None:
            progress.stop()
    summary.elapsed_s = time.monotonic() - started
    summary.simulated_s = (last_t - first_t) if first_t is not None else 0.0
    return summary


def _progress(console: Console | None, description: str, total: int | None) -> Progress | None:
    if console is None:
        return None
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[answers]}"), TimeElapsedColumn(), console=console, transient=False)
