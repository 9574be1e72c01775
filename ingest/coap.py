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
follows as a separate response.  Tokens are per device, stored as SHA-256(salt ‖ token) in
device_credentials (migration 4)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
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

from .downlink import DownlinkService, parse_ack_ids

log = logging.getLogger(__name__)

CONTENT_FORMATS = {42: "application/octet-stream", 50: "application/json", 110: "application/senml+json",
                   112: "application/senml+cbor"}
# Linux's SO_RCVBUFFORCE (asm-generic/socket.h: 33); Python's socket module does not name it.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9._~-]{16,128}$")    # URI-query safe without escaping
HANDOFF_MAX = 4096     # uplinks accepted but not yet in the pipeline's queue; past it: 5.03 + Max-Age
UNKNOWN = (False, None, None)


# ----------------------------------------------------------------------------- credentials

def hash_token(salt: bytes, token: str) -> bytes:
    """SHA-256(salt ‖ token).  Tokens are ≥ 16 random characters, so a fast hash is enough and
    keeps the check cheap at thousands of uplinks a second (a slow KDF protects weak passwords)."""
    return hashlib.sha256(salt + token.encode()).digest()


def set_device_token(conn: psycopg.Connection, device_id: str, token: str | None = None) -> str:
    """Set (or rotate) a device's CoAP token; returns it (generated when not given).  LookupError
    for an unregistered device, ValueError for a token that is not 16-128 URI-safe characters."""
    token = token if token is not None else secrets.token_urlsafe(24)
    if not TOKEN_PATTERN.match(token):
        raise ValueError("a CoAP token is 16-128 characters of A-Z a-z 0-9 . _ ~ -")
    if conn.execute("SELECT 1 FROM devices WHERE device_id = %s", (device_id,)).fetchone() is None:
        raise LookupError(f"no device {device_id}")
    salt = os.urandom(16)
    conn.execute("""INSERT INTO device_credentials (device_id, salt, token_hash) VALUES (%s, %s, %s)
                    ON CONFLICT (device_id) DO UPDATE SET salt = excluded.salt, token_hash = excluded.token_hash,
                        updated_at = now()""", (device_id, salt, hash_token(salt, token)))
    return token


class DeviceCredentials:
    """device id → (registered?, salt, hash), cached: known devices for `ttl_s` (a rotated token is
    re-read after a mismatch), unknown ids for `unknown_ttl_s`.  Misses are read together: one query
    at a time, for every id missed while the previous one ran (a burst of devices costs a few
    queries, not one thread hand-off and one query each)."""

    MAX_ENTRIES = 200_000

    def __init__(self, connect: Callable[[], psycopg.Connection], ttl_s: float = 60.0,
                 unknown_ttl_s: float = 5.0) -> None:
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self._ttl_s, self._unknown_ttl_s = ttl_s, unknown_ttl_s
        self._cache: dict[str, tuple[float, bool, bytes | None, bytes | None]] = {}
        # Event-loop side of the batched lookups:
        self._wanted: set[str] = set()                    # ids the next query reads
        self._next_lookup: asyncio.Future | None = None   # resolved with (entries, error) by that query
        self._looking_up = False
        self.lookups = 0                                  # queries run (each for a set of ids)

    async def check(self, device_id: str, token: str | None, executor) -> str:
        """`ok`, `bad_token`, `no_token` (none set for the device) or `unknown_device`."""
        entry = self._cache.get(device_id)
        if entry is None or time.monotonic() - entry[0] >= (self._ttl_s if entry[1] else self._unknown_ttl_s):
            entry = await self._lookup(device_id, entry, executor)
        verdict = _verdict(entry, token)
        if verdict == "bad_token" and time.monotonic() - entry[0] > 2.0:
            verdict = _verdict(await self._lookup(device_id, entry, executor), token)
        return verdict

    async def _lookup(self, device_id: str, cached, executor):
        loop = asyncio.get_running_loop()
        self._wanted.add(device_id)
        if self._next_lookup is None:
            self._next_lookup = loop.create_future()
        waiter = self._next_lookup
        if not self._looking_up:
            self._looking_up = True
            loop.create_task(self._look_up_wanted(executor))
        entries, error = await asyncio.shield(waiter)    # shared: one cancelled request must not cancel it
        if error is None:
            return entries[device_id]
        if cached is not None:          # the database is away: what we knew still holds
            return cached
        raise Unavailable("credentials cannot be checked now (database unreachable)") from error

    async def _look_up_wanted(self, executor) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._wanted:
                ids, self._wanted = self._wanted, set()
                waiter, self._next_lookup = self._next_lookup, None
                entries, error = {}, None
                try:
                    found = await loop.run_in_executor(executor, self._fetch, ids)
                except Exception as exc:       # the waiters answer 5.03 or use what they knew
                    error = exc
                else:
                    if len(self._cache) + len(ids) > self.MAX_ENTRIES:   # bounded: random ids must not grow it
                        self._cache.clear()
                    now = time.monotonic()
                    for device_id in ids:
                        entries[device_id] = self._cache[device_id] = (now, *found.get(device_id, UNKNOWN))
                if not waiter.done():
                    waiter.set_result((entries, error))
        finally:
            self._looking_up = False

    def _fetch(self, device_ids: set[str]) -> dict[str, tuple[bool, bytes | None, bytes | None]]:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
                self._conn.autocommit = True
            try:
                rows = self._conn.execute("""SELECT d.device_id, d.status, c.salt, c.token_hash FROM devices d
                                             LEFT JOIN device_credentials c USING (device_id)
                                             WHERE d.device_id = ANY(%s)""", (list(device_ids),)).fetchall()
            except psycopg.OperationalError:
                self._conn.close()
                self._conn = None
                raise
            self.lookups += 1
        return {device_id: (True, bytes(salt) if salt is not None else None,
                            bytes(digest) if digest is not None else None)
                for device_id, status, salt, digest in rows if status != "retired"}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _verdict(entry, token: str | None) -> str:
    _, known, salt, digest = entry
    if not known:
        return "unknown_device"
    if digest is None:
        return "no_token"
    if token is None or not hmac.compare_digest(hash_token(salt, token), digest):
        return "bad_token"
    return "ok"


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
        tune_incoming(self._context.request_interfaces[0].token_interface, self._tuning)
        if self.rcvbuf < wanted:
            log.warning("CoAP receive buffer is %d bytes, not the %d asked: raise net.core.rmem_max",
                        self.rcvbuf, wanted)
        log.info("CoAP listening on %s port %d (receive buffer %d bytes)", self.settings.coap_bind, self.port,
                 self.rcvbuf)

    # --------------------------------------------------------------- one request
    async def handle(self, request: aiocoap.Message) -> aiocoap.Message:
        self.counters["requests"] += 1
        path = request.opt.uri_path
        if len(path) != 2 or path[0] != "up" or not path[1]:
            return self._refuse("not_found", codes.NOT_FOUND, "uplinks go to /up/{device_id}")
        device_id = path[1]
        content_format = None if request.opt.content_format is None else int(request.opt.content_format)
        if content_format is not None and content_format not in CONTENT_FORMATS:
            return self._refuse("bad_format", codes.UNSUPPORTED_CONTENT_FORMAT,
                                f"content format {content_format}; accepted: 42, 50, 110, 112")
        if len(request.payload) > self.settings.coap_max_payload:
            self.counters["too_large"] += 1
            return TooLarge(self.settings.coap_max_payload).to_message()
        query = _query(request.opt.uri_query)
        if self._closing:
            self.counters["closing"] += 1
            return Unavailable("gateway shutting down, retry").to_message()
        self._inflight += 1
        try:
            return await self._accept(request, device_id, content_format, query)
        finally:
            self._inflight -= 1

    async def _accept(self, request, device_id: str, content_format, query: dict[str, list[str]]):
        token = (query.get("t") or [None])[0]
        try:
            verdict = await self._credentials.check(device_id, token, self._executor)
        except Unavailable as exc:
            self.counters["unavailable"] += 1
            return exc.to_message()
        if verdict == "bad_token" or (verdict == "no_token" and self.settings.coap_require_credential):
            return self._refuse("unauthorized", codes.UNAUTHORIZED,
                                "wrong or missing token (?t=...)" if verdict == "bad_token"
                                else "no CoAP token is set for this device")
        if verdict == "unknown_device" and not self.settings.coap_quarantine_unknown:
            return self._refuse("unknown_device", codes.NOT_FOUND, f"no registered device {device_id}")
        loop = asyncio.get_running_loop()
        if query.get("ack") and verdict != "unknown_device" and self._downlinks is not None:
            await self._acknowledge(loop, device_id, query["ack"])
        if len(self._outbox) >= self._handoff_max:        # the pipeline does not keep up, or is stopped
            self.counters["busy"] += 1
            return Unavailable("gateway busy, retry", retry_after_s=5).to_message()
        done: asyncio.Future[Outcome] = loop.create_future()
        self._outbox.append(Uplink(device_id=device_id, payload=request.payload, transport="coap",
                                   received_at=time.time(), meta={"peer": _peer(request.remote),
                                                                  "content_format": content_format},
                                   ack=partial(self._ack, done)))
        if not self._outbox_ready.is_set():
            self._outbox_ready.set()
        outcome = await done
        self.counters[outcome.status] += 1
        if outcome.status == "rejected":
            if outcome.reason == "unknown_device":
                return _response(codes.NOT_FOUND, f"unknown device {device_id}: uplink kept in quarantine")
            code = codes.INTERNAL_SERVER_ERROR if outcome.reason == "storage" else codes.BAD_REQUEST
            return _response(code, f"{outcome.reason}: {outcome.detail}")
        response = _response(codes.CHANGED)          # stored, duplicate, or spooled (fsync'd journal)
        if (outcome.status in ("stored", "duplicate") and self._downlinks is not None
                and self._downlinks.has_pending(device_id)):
            try:
                claimed = await loop.run_in_executor(self._executor, self._downlinks.claim, device_id, "coap", 1)
            except psycopg.Error as exc:      # the reading is committed: answer 2.04 without a command
                log.warning("downlink for %s not claimed: %s", device_id, str(exc).splitlines()[0])
                claimed = []
            if claimed:
                downlink_id, _, payload = claimed[0]
                response = _response(codes.CHANGED, payload=payload)
                response.opt.location_query = (f"dl={downlink_id}",)
                response.opt.content_format = 42
        return response

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

    def _ack(self, done: asyncio.Future, outcome: Outcome) -> None:
        """The Uplink's ack, called in the writer thread after the commit: buffered for the loop."""
        with self._acks_lock:
            self._acks.append((done, outcome))
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
        for done, outcome in acks:
            if not done.done():
                done.set_result(outcome)

    def _refuse(self, counter: str, code, text: str) -> aiocoap.Message:
        self.counters[counter] += 1
        return _response(code, text)


def _query(options) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in options:
        key, _, value = item.partition("=")
        out.setdefault(key, []).append(value)
    return out


def _peer(remote) -> str:
    """`host:port` of a UDP peer, an IPv4-mapped address as IPv4 (as aiocoap's `hostinfo`, without
    its ipaddress parsing on every request)."""
    host, port = remote.sockaddr[0], remote.sockaddr[1]
    if host.startswith("::ffff:") and "." in host:
        return f"{host[7:]}:{port}"
    return f"[{host}]:{port}"
