"""CoAP transport: ``POST coap://HOST/up/{device_id}?t=<token>[&ack=<downlink id>]`` (aiocoap, its
own thread and event loop).  Bytes + metadata → `Uplink` → pipeline; the answer waits for the commit.

* 2.04 Changed once the reading is committed (a duplicate too: it was stored once; or `spooled`:
  fsync'd in the gateway's journal while the database is away), carrying the device's next queued
  command, if any, with its id in Location-Query ``dl=<id>``;
* 4.00 + diagnostic for a payload the decoder refused (kept in rejected_uplinks), 4.01 for a missing
  or wrong token, 4.04 for another path and for an unregistered device (kept as `unknown_device`),
  4.13 (+ Size1) past `coap_max_payload`, also mid block-wise transfer, 4.15 for a content format
  other than 42/50/110/112, 5.00 when the database refused the rows, 5.03 (+ Max-Age) while shutting
  down, when a token cannot be checked because the database is away and the device is not cached,
  or when `HANDOFF_MAX` accepted uplinks already wait for the pipeline (busy; nothing stored).

The 2.04 rides on the CON's ACK when the commit comes within `coap_empty_ack_delay_s`, otherwise it
follows as a separate response.  Single-datagram uplinks are read and answered by
`coap_fast.DatagramFront`; aiocoap serves the rest (block-wise, discovery, pings, ACKs of separate
responses) through the same socket.  Tokens: `coap_credentials`."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import aiocoap
import psycopg
from aiocoap import error as coap_error
from aiocoap import resource
from aiocoap.blockwise import Block1Spool
from aiocoap.numbers import codes
from aiocoap.numbers.constants import TransportTuning
from aiocoap.pipe import error_to_message, run_driving_pipe

from iotjx.model import Outcome, Uplink
from iotjx.settings import Settings, bind_address

from .coap_credentials import (TOKEN_PATTERN, CredentialsUnavailable, DeviceCredentials, hash_token,
                               set_device_token)
from .coap_fast import FAST_OPTIONS, DatagramFront, Exchange
from .downlink import DownlinkService, parse_ack_ids

__all__ = ["TOKEN_PATTERN", "CoapIngest", "DeviceCredentials", "hash_token", "set_device_token"]

log = logging.getLogger(__name__)

CONTENT_FORMATS = {42: "application/octet-stream", 50: "application/json", 110: "application/senml+json",
                   112: "application/senml+cbor"}
# Linux's SO_RCVBUFFORCE (asm-generic/socket.h: 33); Python's socket module does not name it.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)
# What `handle` understands: the datagram front's options plus Block2 (23), Block1 (27), Size2 (28).
RECOGNIZED_OPTIONS = FAST_OPTIONS | {23, 27, 28}
CLAIM = object()        # `_answer_for`: 2.04, carrying the device's next command if one is still there
HANDOFF_MAX = 4096     # uplinks accepted but not yet in the pipeline's queue; past it: 5.03 + Max-Age


# ----------------------------------------------------------------------------- errors and block-wise

class TooLarge(coap_error.ConstructionRenderableError):
    """4.13 with Size1 = the limit (RFC 7959 §2.9.3), so a client knows what would fit."""

    code = codes.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, limit: int) -> None:
        super().__init__(f"uplinks are limited to {limit} bytes")
        self.limit = limit

    def to_message(self):
        message = super().to_message()
        message.opt.size1 = self.limit
        return message


class Unavailable(coap_error.ConstructionRenderableError):
    """5.03 with Max-Age: the device should try again later (RFC 7252 §5.9.3.4)."""

    code = codes.SERVICE_UNAVAILABLE

    def __init__(self, message: str, retry_after_s: int = 30) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def to_message(self):
        message = super().to_message()
        message.opt.max_age = self.retry_after_s
        return message


class BoundedBlock1Spool(Block1Spool):
    """aiocoap's Block1 reassembly, refusing a body past `limit` as soon as Size1 or the blocks say so."""

    def __init__(self, limit: int, counters: Counter) -> None:
        super().__init__()
        self.limit = limit
        self._counters = counters

    def feed_and_take(self, req):
        block1 = req.opt.block1
        if block1 is not None and ((req.opt.size1 or 0) > self.limit
                                   or block1.block_number * block1.size + len(req.payload) > self.limit):
            self._counters["too_large"] += 1
            raise TooLarge(self.limit)      # the partial assembly times out with aiocoap's spool
        return super().feed_and_take(req)


class ServerTuning(TransportTuning):
    """RFC 7252's transport parameters, but with this server's EMPTY_ACK_DELAY: how long aiocoap
    holds a confirmable request's ACK hoping to piggyback the answer on it."""

    def __init__(self, empty_ack_delay_s: float) -> None:
        if not 0 < empty_ack_delay_s < self.ACK_TIMEOUT:
            raise ValueError(f"the empty-ACK delay must be above 0 and below ACK_TIMEOUT ({self.ACK_TIMEOUT} s), "
                             f"or every device retransmits: {empty_ack_delay_s}")
        self.EMPTY_ACK_DELAY = empty_ack_delay_s


class ServerContext(aiocoap.Context):
    """aiocoap's Context, except that a request's render task is not named ``"Rendering for %r" %
    request``: that repr formats the peer address with two ipaddress parses, on every request
    (~12 % of the CoAP thread under load, in a bare aiocoap server too)."""

    def render_to_pipe(self, pipe) -> None:
        run_driving_pipe(error_to_message(pipe, self.log), self._render_to_pipe(pipe), name="iotjx-coap-request")


def tune_incoming(message_manager, tuning: TransportTuning) -> None:
    """Give every message `message_manager` receives `tuning`: aiocoap schedules a request's empty
    ACK after *the request's* `transport_tuning.EMPTY_ACK_DELAY`, and a decoded message carries the
    library default; this sets it per server instead of changing aiocoap's class constant."""
    dispatch = message_manager.dispatch_message

    def dispatch_tuned(message) -> None:
        message.transport_tuning = tuning
        dispatch(message)

    message_manager.dispatch_message = dispatch_tuned


async def _ready(response: aiocoap.Message) -> aiocoap.Message:
    return response


def _response(code, text: str = "", payload: bytes = b"") -> aiocoap.Message:
    # Diagnostic payloads (RFC 7252 §5.5.2) stay short: a sleeping device pays for every byte.
    return aiocoap.Message(code=code, payload=payload or text.encode()[:512])


# ----------------------------------------------------------------------------- the resource

class GatewayRoot(resource.Resource, resource.PathCapable):
    """The whole CoAP site: /up/{device_id} and /.well-known/core.  One resource that reads the path
    itself, because aiocoap's Site deep-copies every request to strip the path (~10 % of a request)."""

    LINKS = b'</up>;rt="iotjx.uplink";ct="42 50 110 112"'

    def __init__(self, ingest: CoapIngest) -> None:
        super().__init__()
        self._ingest = ingest
        self._block1 = BoundedBlock1Spool(ingest.settings.coap_max_payload, ingest.counters)

    async def render_to_pipe(self, pipe) -> None:
        request = pipe.request
        if request.opt.block1 is not None or request.opt.block2 is not None:
            return await super().render_to_pipe(pipe)      # aiocoap's Block1 assembly, Block2 cache
        # A single-datagram request (nearly all): the same as aiocoap's path minus the block-wise
        # bookkeeping, which a response that fits one datagram does not need.
        response = await self.render(request)
        if len(response.payload) > request.remote.maximum_payload_size:     # a large command: Block2
            response = await self._block2.extract_or_insert(request, partial(_ready, response))
        pipe.add_response(response, is_last=True)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._ingest.handle(request)

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if tuple(request.opt.uri_path) != (".well-known", "core"):
            return _response(codes.NOT_FOUND)
        message = aiocoap.Message(code=codes.CONTENT, payload=self.LINKS)
        message.opt.content_format = 40          # application/link-format
        return message


class CoapIngest:
    """The CoAP server: `start` (returns once bound; `.port`), `stop` (waits for answers in flight).
    With `ack_flush` given, a batch's answers cost one event-loop wake-up; without it each burst of
    acks wakes the loop once."""

    def __init__(self, settings: Settings, submit: Callable[[Uplink], None],
                 credentials: DeviceCredentials, downlinks: DownlinkService | None = None, *,
                 ack_flush: Callable[[Callable[[], None]], None] | None = None,
                 handoff_max: int = HANDOFF_MAX) -> None:
        """`ack_flush`, when given (`Pipeline.add_ack_flush`), registers `flush_acks`."""
        self.settings = settings
        self._submit = submit
        self._credentials = credentials
        self._downlinks = downlinks
        self._tuning = ServerTuning(settings.coap_empty_ack_delay_s)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="iotjx-coap-db")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: aiocoap.Context | None = None
        self._front: DatagramFront | None = None
        self._tasks: set[asyncio.Task] = set()        # the front's requests that needed a task
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing = False
        self._inflight = 0
        self._start_error: BaseException | None = None
        # Uplinks go to `submit` from a thread of their own: `submit` blocks while the pipeline is
        # full, and the event loop must keep answering (5.03 once `handoff_max` are waiting).
        self._handoff_max = handoff_max
        self._outbox: deque[Uplink | None] = deque()
        self._outbox_ready = threading.Event()
        self._submitter: threading.Thread | None = None
        # Acks arrive in the writer thread; the loop resolves them in bulk (`_answer_acked`).
        self._acks: list[tuple[asyncio.Future, Outcome]] = []
        self._acks_lock = threading.Lock()
        self._acks_wake_pending = False
        self._ack_flush_wired = ack_flush is not None     # then the pipeline's flush wakes the loop
        self.port: int | None = None
        self.rcvbuf: int | None = None
        self.counters: Counter[str] = Counter()
        if ack_flush is not None:
            ack_flush(self.flush_acks)

    # --------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 10.0) -> None:
        self._submitter = threading.Thread(target=self._hand_over, name="iotjx-coap-submit", daemon=True)
        self._submitter.start()
        self._thread = threading.Thread(target=self._serve, name="iotjx-coap", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._start_error is not None:
            raise RuntimeError(f"CoAP server did not start on {self.settings.coap_bind}: {self._start_error}")

    def stop(self, drain_s: float = 10.0) -> None:
        """Refuse new uplinks (5.03), let the ones in flight get their answer, then close."""
        if self._thread is None:
            return
        self._closing = True
        deadline = time.monotonic() + drain_s
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        if self._submitter is not None:
            self._outbox.append(None)      # after what is queued: everything accepted reaches the pipeline
            self._outbox_ready.set()
            self._submitter.join(10)
            if self._submitter.is_alive():
                log.error("the pipeline did not take the last CoAP uplinks within 10 s (they were not answered)")
            self._submitter = None
        self._executor.shutdown(wait=True)
        self._credentials.close()

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:       # report to start(), which raises in the caller's thread
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._front.close()
            loop.run_until_complete(self._context.shutdown())
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _open(self) -> None:
        self._context = await ServerContext.create_server_context(
            GatewayRoot(self), bind=bind_address(self.settings.coap_bind), transports=["udp6"])
        sock = self._context.request_interfaces[0].token_interface.message_interface.transport.get_extra_info("socket")
        # A burst of devices waking at once overflows the default ~200 kB buffer (CEILINGS.md); the
        # kernel caps the request at net.core.rmem_max and reports double the granted size.
        wanted = self.settings.coap_rcvbuf
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
        self.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        if self.rcvbuf < wanted and SO_RCVBUFFORCE is not None:
            try:                                  # past rmem_max: needs CAP_NET_ADMIN
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
                self.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
            except PermissionError:
                pass
        self.port = sock.getsockname()[1]
        # The answer waits for the commit (≥ the batch age).  With aiocoap's EMPTY_ACK_DELAY of 0.1 s
        # it would go as an empty ACK plus a separate confirmable response, tracked as an exchange
        # (aiocoap 0.4 scans every exchange each time one ends) and ACKed back: a longer delay, still
        # below the devices' ACK_TIMEOUT, lets most answers ride on the ACK.
        manager = self._context.request_interfaces[0].token_interface
        tune_incoming(manager, self._tuning)
        self._front = DatagramFront(asyncio.get_running_loop(), sock, manager.message_interface, manager,
                                    self._on_uplink, self.settings.coap_empty_ack_delay_s, counters=self.counters,
                                    max_payload=self.settings.coap_max_payload)
        self._front.install()
        if self.rcvbuf < wanted:
            log.warning("CoAP receive buffer is %d bytes, not the %d asked: raise net.core.rmem_max",
                        self.rcvbuf, wanted)
        log.info("CoAP listening on %s port %d (receive buffer %d bytes)", self.settings.coap_bind, self.port,
                 self.rcvbuf)

    # --------------------------------------------------------------- one request
    async def handle(self, request: aiocoap.Message) -> aiocoap.Message:
        """A request aiocoap parsed: block-wise, or carrying an option the datagram front leaves to it."""
        self.counters["requests"] += 1
        path = request.opt.uri_path
        if len(path) != 2 or path[0] != "up" or not path[1]:
            return self._refuse("not_found", codes.NOT_FOUND, "uplinks go to /up/{device_id}")
        unknown = [o.number for o in request.opt.option_list() if o.number.is_critical()
                   and o.number not in RECOGNIZED_OPTIONS]
        if unknown:       # RFC 7252 §5.4.1 (aiocoap leaves this to the resource)
            return self._refuse("bad_option", codes.BAD_OPTION,
                                f"critical option {int(unknown[0])} is not supported here")
        content_format = None if request.opt.content_format is None else int(request.opt.content_format)
        refusal = self._precheck(content_format, len(request.payload))
        if refusal is not None:
            return refusal
        return await self._accept(path[1], content_format, request.payload, _query(request.opt.uri_query),
                                  _peer(request.remote.sockaddr))

    def _on_uplink(self, ex: Exchange, parsed: tuple) -> None:
        """A single-datagram uplink from the datagram front (the event loop's thread).  Answered
        without a task when the device's credentials are cached and no downlink ack rides along."""
        _, _, _, device_id, query_items, content_format, payload = parsed
        self.counters["requests"] += 1
        refusal = self._precheck(content_format, len(payload))
        if refusal is not None:
            return self._front.answer(ex, refusal)
        query = _query(query_items)
        if query.get("ack") and self._downlinks is not None:      # a downlink ack to record first
            self._spawn(self._answer_later(ex, device_id, content_format, payload, query))
            return None
        token = (query.get("t") or [None])[0]
        verdict = self._credentials.cached(device_id, token)
        take = partial(self._take_checked, ex, device_id, content_format, payload)
        if verdict is None:          # read with the other misses, then on (a callback, not a task)
            self._inflight += 1      # held while the lookup runs: `stop` waits for it
            self._credentials.check_then(device_id, token, self._executor, take)
            return None
        self._inflight += 1
        return take(verdict)

    def _take_checked(self, ex: Exchange, device_id: str, content_format, payload: bytes,
                      verdict: str | None) -> None:
        """The front's uplink once its credential verdict is known (None: it cannot be checked now)."""
        self._inflight -= 1
        try:
            if verdict is None:
                self.counters["unavailable"] += 1
                refusal = Unavailable("credentials cannot be checked now (database unreachable)").to_message()
            else:
                refusal = self._admit(verdict, device_id) or self._enqueue(
                    device_id, payload, content_format, _peer(ex.addr), partial(self._ack, ex, device_id))
        except Exception:
            log.exception("CoAP uplink from %s not handled", device_id)
            refusal = _response(codes.INTERNAL_SERVER_ERROR)
        if refusal is not None:
            self._front.answer(ex, refusal)
        else:
            self._inflight += 1      # until its answer (`_answer_acked`)

    def _spawn(self, coro) -> None:
        """Run `coro` as a task, referenced until done (the loop keeps only weak references)."""
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_later(self, ex: Exchange, device_id: str, content_format, payload: bytes, query) -> None:
        try:
            response = await self._accept(device_id, content_format, payload, query, _peer(ex.addr))
        except Exception:
            log.exception("CoAP uplink from %s not handled", device_id)
            response = _response(codes.INTERNAL_SERVER_ERROR)
        self._front.answer(ex, response)

    def _precheck(self, content_format: int | None, size: int) -> aiocoap.Message | None:
        """The refusal for what the request itself shows, or None."""
        if content_format is not None and content_format not in CONTENT_FORMATS:
            return self._refuse("bad_format", codes.UNSUPPORTED_CONTENT_FORMAT,
                                f"content format {content_format}; accepted: 42, 50, 110, 112")
        if size > self.settings.coap_max_payload:
            self.counters["too_large"] += 1
            return TooLarge(self.settings.coap_max_payload).to_message()
        if self._closing:
            self.counters["closing"] += 1
            return Unavailable("gateway shutting down, retry").to_message()
        return None

    def _admit(self, verdict: str, device_id: str) -> aiocoap.Message | None:
        """The refusal the credential verdict calls for, or None."""
        if verdict == "bad_token" or (verdict == "no_token" and self.settings.coap_require_credential):
            return self._refuse("unauthorized", codes.UNAUTHORIZED,
                                "wrong or missing token (?t=...)" if verdict == "bad_token"
                                else "no CoAP token is set for this device")
        if verdict == "unknown_device" and not self.settings.coap_quarantine_unknown:
            return self._refuse("unknown_device", codes.NOT_FOUND, f"no registered device {device_id}")
        return None

    def _enqueue(self, device_id: str, payload: bytes, content_format, peer: str, ack) -> aiocoap.Message | None:
        """Hand the uplink to the submit thread; 5.03 when `handoff_max` already wait."""
        if len(self._outbox) >= self._handoff_max:        # the pipeline does not keep up, or is stopped
            self.counters["busy"] += 1
            return Unavailable("gateway busy, retry", retry_after_s=5).to_message()
        self._outbox.append(Uplink(device_id=device_id, payload=payload, transport="coap", received_at=time.time(),
                                   meta={"peer": peer, "content_format": content_format}, ack=ack))
        if not self._outbox_ready.is_set():
            self._outbox_ready.set()
        return None

    async def _accept(self, device_id: str, content_format, payload: bytes, query: dict[str, list[str]],
                      peer: str) -> aiocoap.Message:
        self._inflight += 1
        try:
            try:
                verdict = await self._credentials.check(device_id, (query.get("t") or [None])[0], self._executor)
            except CredentialsUnavailable as exc:
                self.counters["unavailable"] += 1
                return Unavailable(str(exc)).to_message()
            refusal = self._admit(verdict, device_id)
            if refusal is not None:
                return refusal
            loop = asyncio.get_running_loop()
            if query.get("ack") and verdict != "unknown_device" and self._downlinks is not None:
                await self._acknowledge(loop, device_id, query["ack"])
            done: asyncio.Future[Outcome] = loop.create_future()
            refusal = self._enqueue(device_id, payload, content_format, peer, partial(self._ack, done, device_id))
            if refusal is not None:
                return refusal
            response = self._answer_for(await done, device_id)
            return await self._with_downlink(device_id) if response is CLAIM else response or _response(codes.CHANGED)
        finally:
            self._inflight -= 1

    def _answer_for(self, outcome: Outcome, device_id: str):
        """The answer to a committed (or refused) uplink: a message, None for a bare 2.04, or CLAIM
        when a command may wait for the device (2.04 carrying it: `_with_downlink`)."""
        self.counters[outcome.status] += 1
        if outcome.status == "rejected":
            if outcome.reason == "unknown_device":
                return _response(codes.NOT_FOUND, f"unknown device {device_id}: uplink kept in quarantine")
            code = {"storage": codes.INTERNAL_SERVER_ERROR, "too_large": codes.REQUEST_ENTITY_TOO_LARGE
                    }.get(outcome.reason, codes.BAD_REQUEST)      # too_large: past its model's size limit
            return _response(code, f"{outcome.reason}: {outcome.detail}")
        # stored, duplicate, or spooled (fsync'd journal: commands wait for the committed reading)
        if (outcome.status in ("stored", "duplicate") and self._downlinks is not None
                and self._downlinks.has_pending(device_id)):
            return CLAIM
        return None

    async def _with_downlink(self, device_id: str) -> aiocoap.Message:
        loop = asyncio.get_running_loop()
        try:
            claimed = await loop.run_in_executor(self._executor, self._downlinks.claim, device_id, "coap", 1)
        except psycopg.Error as exc:      # the reading is committed: answer 2.04 without a command
            log.warning("downlink for %s not claimed: %s", device_id, str(exc).splitlines()[0])
            claimed = []
        if not claimed:
            return _response(codes.CHANGED)
        downlink_id, _, payload = claimed[0]
        response = _response(codes.CHANGED, payload=payload)
        response.opt.location_query = (f"dl={downlink_id}",)
        response.opt.content_format = 42
        return response

    async def _answer_with_downlink(self, ex: Exchange, device_id: str) -> None:
        try:
            self._front.answer(ex, await self._with_downlink(device_id))
        finally:
            self._inflight -= 1

    async def _acknowledge(self, loop, device_id: str, values: list[str]) -> None:
        try:
            ids = [i for v in values for i in (parse_ack_ids(v) or [])]
            await loop.run_in_executor(self._executor, self._downlinks.acknowledge, device_id, ids)
        except (ValueError, psycopg.Error) as exc:   # the uplink still counts; the device acks again later
            self.counters["bad_ack"] += 1
            log.warning("ack %s from %s not recorded: %s", values, device_id, str(exc).splitlines()[0])

    # --------------------------------------------------------------- to and from the pipeline
    def _hand_over(self) -> None:
        """Thread: move accepted uplinks to the pipeline (`submit` may block; the loop must not)."""
        while True:
            self._outbox_ready.wait()
            self._outbox_ready.clear()       # before draining: an append after the drain sets it again
            while self._outbox:
                uplink = self._outbox.popleft()
                if uplink is None:
                    return
                self._submit(uplink)

    def _ack(self, waiter: asyncio.Future | Exchange, device_id: str, outcome: Outcome) -> None:
        """The Uplink's ack, called in the writer thread after the commit: buffered for the loop."""
        with self._acks_lock:
            self._acks.append((waiter, device_id, outcome))
            if self._acks_wake_pending or self._ack_flush_wired:
                return
            self._acks_wake_pending = True
        self._wake_for_acks()

    def flush_acks(self) -> None:
        """Answer every uplink acked since the last call, with one event-loop wake-up (the pipeline
        calls this after each batch's acks: `pipeline.add_ack_flush(coap.flush_acks)`)."""
        with self._acks_lock:
            if not self._acks or self._acks_wake_pending:
                return
            self._acks_wake_pending = True
        self._wake_for_acks()

    def _wake_for_acks(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._answer_acked)
        except RuntimeError:      # the server closed meanwhile: the device retransmits, dedup answers
            pass

    def _answer_acked(self) -> None:
        with self._acks_lock:
            acks, self._acks = self._acks, []
            self._acks_wake_pending = False
        for waiter, device_id, outcome in acks:
            if type(waiter) is not Exchange:           # an aiocoap-path request's future
                if not waiter.done():
                    waiter.set_result(outcome)
                continue
            response = self._answer_for(outcome, device_id)
            if response is CLAIM:
                self._spawn(self._answer_with_downlink(waiter, device_id))
                continue
            self._inflight -= 1
            self._front.answer(waiter, response)

    def _refuse(self, counter: str, code, text: str) -> aiocoap.Message:
        self.counters[counter] += 1
        return _response(code, text)


def _query(options) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in options:
        key, _, value = item.partition("=")
        out.setdefault(key, []).append(value)
    return out


def _peer(sockaddr) -> str:
    """`host:port` of a UDP peer, an IPv4-mapped address as IPv4 (as aiocoap's `hostinfo`, without
    its ipaddress parsing on every request)."""
    host, port = sockaddr[0], sockaddr[1]
    if host.startswith("::ffff:") and "." in host:
        return f"{host[7:]}:{port}"
    return f"[{host}]:{port}"
