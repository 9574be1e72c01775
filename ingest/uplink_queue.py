"""The pipeline's bounded queue, taken a batch at a time.

`queue.Queue` costs a lock round and a condition notify per item on both sides; with paho's network
thread putting and the writer taking 5,000 at a time, every contended lock also means waiting for
the GIL (up to the 5 ms switch interval while the other thread computes).  Here a put is an append
under an uncontended lock, a take is one slice of the list, and a thread is woken only when it has
something to do: the taker when the first item arrives or a whole batch is there, a blocked putter
when a take made room.

A take may also end when the input pauses (`idle_s`) and the taker's consumer is idle (`idle_ok`):
devices that wait for their answer before sending again (CoAP: one confirmable request in flight
per device) stop the input until their batch commits, and waiting out the batch age then only adds
latency (the radio of an NB-IoT device stays on while it waits).  While a batch is still being
written, a pause is more likely the sender's window waiting for acks (MQTT), and cutting the batch
short would only make the batches smaller.

Two bounds, either of which holds putters back: `maxsize` items and (optionally) `max_bytes` of
their weight (`weigh`: an uplink's payload length).  A put waits while the queue is at either
bound, then goes in whole, so one item heavier than the whole byte bound still passes (once the
queue is below it) instead of waiting for ever; what the queue holds is therefore below
`max_bytes` plus one put's weight.  Items are weighed once, on the putter's side; the taker
subtracts the weights of what it takes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Closed(RuntimeError):
    """Put into a queue that was closed."""


class UplinkQueue(Generic[T]):
    """A bounded FIFO: `put` blocks while it holds `maxsize` items or `max_bytes` of their weight;
    `take` returns up to `n` items at once, by size or by age."""

    def __init__(self, maxsize: int, max_bytes: int | None = None,
                 weigh: Callable[[T], int] | None = None) -> None:
        """`max_bytes` (None: no byte bound) counts `weigh(item)` for each item (required with it)."""
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        if max_bytes is not None and (max_bytes < 1 or weigh is None):
            raise ValueError(f"max_bytes must be at least 1 and come with weigh, not {max_bytes} and {weigh}")
        self._max = maxsize
        self._max_bytes = max_bytes if max_bytes is not None else float("inf")
        self._weigh = weigh if max_bytes is not None else None
        self._items: list[T] = []
        self._weights: list[int] = []                    # beside _items, when weighed
        self._bytes = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)     # putters blocked on a full queue wait here
        self._ready = threading.Event()                  # the taker's wake-up
        self._want = 1                                   # how many items wake the taker
        self._closed = False
        self._last_put = 0.0                             # monotonic time of the latest put

    def put(self, item: T, timeout: float | None = None) -> None:
        """Append `item`; blocks while the queue is full (raises TimeoutError after `timeout` s)."""
        self.put_many((item,), timeout)

    def put_many(self, items: Sequence[T], timeout: float | None = None,
                 weights: Sequence[int] | None = None) -> None:
        """Append `items` at once, in order; blocks while the queue is full.  Once there is room they
        all go in: the queue may exceed its bounds by one put (a caller puts small groups).
        `weights`: the items' weights when the caller has them already (else `weigh` is asked)."""
        if self._weigh is None:
            weights = None
        elif weights is None:
            weights = [*map(self._weigh, items)]            # outside the lock
        elif len(weights) != len(items):
            raise ValueError(f"{len(weights)} weights for {len(items)} items")
        with self._lock:
            if self._closed:
                raise Closed("the queue is closed")
            if self._full():
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._full():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError("the queue stayed full")
                    self._room.wait(remaining)
                    if self._closed:
                        raise Closed("the queue is closed")
            self._items.extend(items)
            if weights is not None:
                self._weights.extend(weights)
                self._bytes += sum(weights)
            self._last_put = time.monotonic()
            wake = len(self._items) >= self._want
        if wake and not self._ready.is_set():
            self._ready.set()

    def _full(self) -> bool:
        return len(self._items) >= self._max or self._bytes >= self._max_bytes

    def wait_room(self, timeout: float) -> bool:
        """True when a `put` would not block now (or the queue is closed: the put raises); waits up
        to `timeout` for a take to make room."""
        if not self._full():                      # the common case, without the lock
            return True
        with self._lock:
            if self._full() and not self._closed and timeout > 0:
                self._room.wait(timeout)
            return not self._full() or self._closed

    def take(self, n: int, max_age_s: float, idle_s: float = 0.0,
             idle_ok: Callable[[], bool] | None = None) -> tuple[list[T], bool]:
        """Up to `n` items, oldest first: waits for the first one, then until `n` are there,
        `max_age_s` has passed, or (`idle_s` > 0) nothing was put for `idle_s` while `idle_ok()`
        (checked each `idle_s`; None: always).  The flag is True once the queue is closed and this
        take emptied it (the taker is done)."""
        while True:
            with self._lock:
                if self._items or self._closed:
                    break
                self._want = 1
                self._ready.clear()
            self._ready.wait()
        deadline = time.monotonic() + max_age_s
        while True:
            with self._lock:
                now = time.monotonic()
                wake_at = deadline
                if idle_s > 0:
                    quiet_at = self._last_put + idle_s
                    if now >= quiet_at and idle_ok is not None and not idle_ok():
                        quiet_at = now + idle_s       # the consumer is busy: look again later
                    wake_at = min(deadline, quiet_at)
                if len(self._items) >= n or self._closed or now >= wake_at:
                    batch = self._items[:n]
                    del self._items[:n]
                    if self._weigh is not None:
                        self._bytes -= sum(self._weights[:n])
                        del self._weights[:n]
                    if batch:
                        self._room.notify_all()
                    self._want = 1
                    return batch, self._closed and not self._items
                self._want = n
                self._ready.clear()
            self._ready.wait(max(0.0, wake_at - time.monotonic()))

    def close(self) -> None:
        """No more puts; the taker gets what is left, then its done flag."""
        with self._lock:
            self._closed = True
            self._room.notify_all()
        self._ready.set()

    def qsize(self) -> int:
        return len(self._items)

    def qbytes(self) -> int:
        """The weight of what the queue holds (0 without a byte bound)."""
        return self._bytes
