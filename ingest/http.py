"""Carrier-platform HTTP push: ``POST /push/ctwing`` and ``POST /push/onenet`` (plus OneNET's GET URL
verification), a small FastAPI app served by uvicorn in a thread of the gateway process.

The body goes to the pipeline untouched as ``Uplink(device_id="", meta={"envelope": …})``: the
pipeline opens the envelope, finds the device by IMEI, and deduplicates by the message the envelope
names (`decoders.carrier.push_identity`), so a retry re-serialised by the platform is stored once.
The answer waits for the commit: CTWing 202, OneNET 200 (OneNET's push manual: anything but 200
makes it push again); a duplicate (a platform's retry) answers the same.  401 for a missing or wrong
token or signature, or a stale or replayed OneNET push; 413 past `http_push_max_body`; 422
problem+json for an envelope or payload the decoders refused (kept in rejected_uplinks); 404 for an
IMEI no device has (kept as `unknown_device`); 503 for a carrier whose token is not configured, and
503 + Retry-After when the pipeline has no room (backpressure: nothing was taken) or has not
committed the push within `http_push_answer_s` (it may still be stored: the retry is then a
duplicate).  The event loop never waits on the pipeline: the hand-off is `try_submit`.

Authentication: CTWing names no push signature in the public record, so the subscription carries
our token, in the header ``X-Push-Token`` or, for a platform form that only takes a URL, the query
``?token=``.  OneNET signs: msg_signature = base64(MD5(token ‖ nonce ‖ msg)), msg as the JSON text
of the ``msg`` member (its string value when it is a string: encrypted pushes).  The signature has
no time of its own, so freshness comes from the signed ``msg.at`` (the platform's time, epoch ms):
a push further than `onenet_push_max_age_s` from now is refused, and so is a nonce (with its
signature) already accepted within that window — remembered in this process (`NonceWindow`).  With
two gateway replicas a replay may reach the replica that has not seen the nonce: the dedup claim in
the database (shared, transactional) then answers it as a duplicate, stores nothing again, and
since the dedup window (a day) is longer than the freshness window, every replay the time check lets
through is one the dedup still remembers.

A tester replaying a capture may give a push its original receive time in the header
``X-Iotjx-Received-At`` (epoch seconds) with a tester account's login (HTTP Basic: the MQTT account's
name and password, `iotjx.mqtt_accounts`), when `replay_enabled`: the push is checked as a live one
(token, signature; a OneNET push's freshness against its original time) and stored at that time
(`ingest.replay`).  The header without a tester's login: 401; with replays off: 403; a time before
2000 or past `replay_max_ahead_s` ahead: kept as a `bad_original_time` reject, 422.  Accepted logins
are remembered for `TESTER_CACHE_S`, so a replay costs one password check a minute, not one a push."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from iotjx.model import Outcome, Uplink
from iotjx.settings import Settings, bind_address

from . import replay

log = logging.getLogger(__name__)

CTWING_TOKEN_HEADER = "X-Push-Token"
BUSY_RETRY_S = 5        # Retry-After when the queue is full (as CoAP's Max-Age for the same)
SLOW_RETRY_S = 10       # Retry-After when the commit did not come in time
TESTER_CACHE_S = 60     # an accepted tester login is not checked again for this long
_WS = re.compile(r"[ \t\n\r]*")


class TooLarge(Exception):
    pass


def onenet_signature(token: str, nonce: str, msg: str) -> str:
    """OneNET's signature of a push or a URL verification: base64(MD5(token + nonce + msg))."""
    return base64.b64encode(hashlib.md5((token + nonce + msg).encode()).digest()).decode()


def raw_members(text: str) -> dict[str, tuple[Any, str]]:
    """A JSON object's top-level members as (value, the exact text of the value): the signature is
    over the text the platform sent, which re-serialising might not reproduce."""
    decoder = json.JSONDecoder()
    i = _WS.match(text, 0).end()
    if text[i:i + 1] != "{":
        raise ValueError("not a JSON object")
    i = _WS.match(text, i + 1).end()
    members: dict[str, tuple[Any, str]] = {}
    if text[i:i + 1] == "}":
        return members
    while True:
        if text[i:i + 1] != '"':
            raise ValueError("expected a member name")
        key, i = json.decoder.scanstring(text, i + 1)
        i = _WS.match(text, i).end()
        if text[i:i + 1] != ":":
            raise ValueError("expected ':'")
        start = _WS.match(text, i + 1).end()
        value, end = decoder.raw_decode(text, start)
        members[key] = (value, text[start:end])
        i = _WS.match(text, end).end()
        if text[i:i + 1] == ",":
            i = _WS.match(text, i + 1).end()
        elif text[i:i + 1] == "}":
            return members
        else:
            raise ValueError("expected ',' or '}'")


@dataclass(frozen=True, slots=True)
class SignedPush:
    """A OneNET push whose signature holds: its nonce, signature, and the signed ``msg.at`` of each
    message it carries (None where absent or not a number)."""

    nonce: str
    signature: str
    times_ms: tuple[float | None, ...]


def onenet_signed(body: bytes, token: str) -> SignedPush | None:
    """The push when its msg_signature (or `signature`) is valid for `token`, else None."""
    try:
        members = raw_members(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, IndexError, RecursionError):
        return None
    signature = (members.get("msg_signature") or members.get("signature") or (None,))[0]
    nonce = (members.get("nonce") or (None,))[0]
    msg = members.get("msg") or members.get("enc_msg")
    if not isinstance(signature, str) or not isinstance(nonce, str) or msg is None:
        return None
    value, raw = msg
    candidates = [value] if isinstance(value, str) else [raw, json.dumps(value, separators=(",", ":"),
                                                                         ensure_ascii=False)]
    signature = signature.replace(" ", "+")        # a '+' that went through form decoding
    if not any(hmac.compare_digest(onenet_signature(token, nonce, c), signature) for c in candidates):
        return None
    messages = value if isinstance(value, list) else [value]
    return SignedPush(nonce, signature, tuple(_time_ms(m) for m in messages))


def onenet_verified(body: bytes, token: str) -> bool:
    """True when a OneNET push body carries a valid msg_signature (or `signature`) for `token`."""
    return onenet_signed(body, token) is not None


def _time_ms(message: Any) -> float | None:
    at = message.get("at") if isinstance(message, dict) else None
    if isinstance(at, bool) or not isinstance(at, (int, float, str)):
        return None
    try:
        return float(at)
    except (ValueError, OverflowError):
        return None


class NonceWindow:
    """OneNET (nonce, signature) pairs seen within the last `window_s`, at most `max_entries` (the
    oldest forgotten first: the dedup claim still stops a replay of those).  A pair is reserved
    while its push is in flight, kept once the push was answered 2xx (stored or a duplicate), and
    released otherwise (503, 500, a reject, the client gone), so the platform's retry of a push we did
    not take goes through the pipeline again."""

    NEW, IN_FLIGHT, TAKEN = "new", "in_flight", "taken"

    def __init__(self, window_s: float, max_entries: int = 200_000) -> None:
        self.window_s = window_s
        self._max = max_entries
        # pair -> (when first seen, taken?), oldest first
        self._seen: OrderedDict[tuple[str, str], tuple[float, bool]] = OrderedDict()
        self._lock = threading.Lock()

    def reserve(self, push: SignedPush, now: float | None = None) -> str:
        """`NEW` (and reserved) when the pair was not seen within the window; `IN_FLIGHT` while its
        first push waits for its commit; `TAKEN` when that push was answered 2xx: a replay."""
        now = time.monotonic() if now is None else now
        key = (push.nonce, push.signature)
        with self._lock:
            seen = self._seen
            while seen and (len(seen) >= self._max or next(iter(seen.values()))[0] < now - self.window_s):
                seen.popitem(last=False)
            entry = seen.get(key)
            if entry is not None:
                return self.TAKEN if entry[1] else self.IN_FLIGHT
            seen[key] = (now, False)
            return self.NEW

    def taken(self, push: SignedPush) -> None:
        with self._lock:
            key = (push.nonce, push.signature)
            entry = self._seen.get(key)
            if entry is not None:
                self._seen[key] = (entry[0], True)

    def release(self, push: SignedPush) -> None:
        with self._lock:
            self._seen.pop((push.nonce, push.signature), None)


def problem(status: int, title: str, detail: str = "", **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    return JSONResponse({"type": "about:blank", "title": title, "status": status, "detail": detail, **extra},
                        status_code=status, media_type="application/problem+json")


class HttpPushIngest:
    """The push endpoint; `start` returns once it listens (`.port`), `stop` lets requests finish."""

    def __init__(self, settings: Settings, try_submit: Callable[[Uplink], bool]) -> None:
        """`try_submit` hands an uplink to the pipeline without waiting (`Pipeline.try_submit`):
        False when it has no room, and the push is answered 503 + Retry-After."""
        self.settings = settings
        self._try_submit = try_submit
        self.nonces = NonceWindow(settings.onenet_push_max_age_s)
        self.counters: Counter[str] = Counter()
        self._testers: dict[tuple[str, bytes], float] = {}      # (name, SHA-256 of password) -> accepted until
        self.app = self._build_app()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # --------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 10.0) -> None:
        host, port = bind_address(self.settings.http_push_bind)
        config = uvicorn.Config(self.app, host=host, port=port, lifespan="off", access_log=False,
                                log_level="warning", timeout_graceful_shutdown=10)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="iotjx-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the push endpoint did not start on {self.settings.http_push_bind}")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        window, dedup = self.settings.onenet_push_max_age_s, self.settings.dedup_window_s
        if dedup and window > dedup:
            log.warning("IOTJX_ONENET_PUSH_MAX_AGE_S (%g s) is longer than IOTJX_DEDUP_WINDOW_S (%g s): a replay "
                        "reaching another replica late in the window is no longer caught by the dedup", window, dedup)
        log.info("carrier push endpoint on %s port %d (ctwing %s, onenet %s)", host, self.port,
                 "on" if self.settings.ctwing_push_token else "off",
                 "on" if self.settings.onenet_push_token else "off")

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True         # uvicorn lets requests in flight get their answer
        self._thread.join(20)
        self._thread = None

    # --------------------------------------------------------------- the app
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="iotjx carrier push", docs_url=None, redoc_url=None, openapi_url=None)

        @app.post("/push/ctwing")
        async def push_ctwing(request: Request):
            token = self.settings.ctwing_push_token
            if not token:
                return self._refuse(503, "ctwing push not configured", "set IOTJX_CTWING_PUSH_TOKEN")
            given = request.headers.get(CTWING_TOKEN_HEADER) or request.query_params.get("token") or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return self._refuse(401, "unauthorized", f"missing or wrong {CTWING_TOKEN_HEADER}")
            return await self._push(request, "ctwing", 202)

        @app.post("/push/onenet")
        async def push_onenet(request: Request):
            return await self._push(request, "onenet", 200)

        @app.get("/push/onenet")
        async def verify_onenet(request: Request):
            # URL verification when the push is configured: echo msg if the signature holds.
            token = self.settings.onenet_push_token
            q = request.query_params
            msg, nonce, signature = q.get("msg"), q.get("nonce"), q.get("signature")
            if not token:
                return self._refuse(503, "onenet push not configured", "set IOTJX_ONENET_PUSH_TOKEN")
            if msg is None or nonce is None or signature is None or not hmac.compare_digest(
                    onenet_signature(token, nonce, msg), signature.replace(" ", "+")):
                return self._refuse(401, "unauthorized", "URL verification signature does not match the token")
            self.counters["onenet_verified"] += 1
            return PlainTextResponse(msg)

        return app

    async def _push(self, request: Request, carrier: str, ok_status: int):
        try:
            body = await _read_body(request, self.settings.http_push_max_body)
        except TooLarge:
            return self._refuse(413, "push too large",
                                f"bodies are limited to {self.settings.http_push_max_body} bytes")
        original: float | None = None
        bad_time: str | None = None
        if replay.TIME_HEADER in request.headers:
            refusal = await self._tester(request)
            if refusal is not None:
                return refusal
            try:
                original = replay.parse_time(request.headers[replay.TIME_HEADER], time.time(),
                                             self.settings.replay_max_ahead_s)
            except replay.ReplayFrameError as exc:
                bad_time = str(exc)
        if bad_time is not None:           # a tester's push whose time is not honoured: kept as a reject
            return await self._submit_and_answer(request, body, carrier, ok_status, bad_time=bad_time)
        signed = None
        if carrier == "onenet":
            token = self.settings.onenet_push_token
            if not token:
                return self._refuse(503, "onenet push not configured", "set IOTJX_ONENET_PUSH_TOKEN")
            signed = onenet_signed(body, token)
            if signed is None:
                return self._refuse(401, "unauthorized", "msg_signature does not match the token (or is missing)")
            if self.nonces.window_s > 0:
                refusal = self._fresh(signed, original)
                if refusal is not None:
                    return refusal
        try:
            response = await self._submit_and_answer(request, body, carrier, ok_status, original)
        except BaseException:           # the client went away: nothing answered, nothing taken for granted
            if signed is not None:
                self.nonces.release(signed)
            raise
        if signed is not None:
            if response.status_code < 300:
                self.nonces.taken(signed)
            else:
                self.nonces.release(signed)      # not taken: the platform's retry goes through again
        return response

    def _fresh(self, signed: SignedPush, original: float | None = None) -> JSONResponse | None:
        """The answer to a OneNET push outside the freshness window (401) — around `original`, its
        original receive time, when a tester replays it; else now —, replayed within it after it
        was taken (200, a duplicate) or while it is still in flight (503), or None for a new one (its
        nonce then reserved)."""
        window = self.nonces.window_s
        now_ms = (time.time() if original is None else original) * 1000
        for at in signed.times_ms:
            if at is None:
                return self._refuse(401, "push without a time", "a signed push must carry msg.at (epoch ms) "
                                    "to be checked for freshness", reason="stale")
            if abs(now_ms - at) > window * 1000:
                return self._refuse(401, "stale push", f"msg.at is {abs(now_ms - at) / 1000:.0f} s from now; "
                                    f"pushes are accepted within {window:g} s (IOTJX_ONENET_PUSH_MAX_AGE_S)",
                                    reason="stale")
        seen = self.nonces.reserve(signed)
        if seen == NonceWindow.TAKEN:
            # The same signed push again (OneNET retries when our 200 was lost, and a replayer sends
            # what it captured): already stored, so answered as the duplicate it is, at the door.
            self.counters["onenet.replayed_nonce"] += 1
            return JSONResponse({"status": "duplicate"}, status_code=200)
        if seen == NonceWindow.IN_FLIGHT:
            return self._busy("the same push is being stored; its retry is answered once it is", BUSY_RETRY_S)
        return None

    async def _tester(self, request: Request) -> JSONResponse | None:
        """None when the request carries a tester account's login (HTTP Basic) and replays are on;
        else the refusal (403 replays off, 401 no or another login, 503 no registry)."""
        if not self.settings.replay_enabled:
            return self._refuse(403, "replays with original times are off",
                                f"{replay.TIME_HEADER} is honoured only with IOTJX_REPLAY_ENABLED", reason="replay_off")
        login = _basic_login(request.headers.get("authorization", ""))
        if login is None:
            return self._refuse(401, "unauthorized", f"{replay.TIME_HEADER} needs a tester account's login (HTTP Basic)",
                                reason="not_a_tester")
        key = (login[0], hashlib.sha256(login[1].encode()).digest())
        if self._testers.get(key, 0.0) > time.monotonic():
            return None
        if self.settings.database_url is None:
            return self._refuse(503, "no registry", "tester logins are checked in the registry (IOTJX_DATABASE_URL)")
        try:
            ok = await asyncio.to_thread(_is_tester, self.settings.database_url, *login)
        except psycopg.Error as exc:
            return self._busy(f"the registry could not check the login: {str(exc).splitlines()[0] if str(exc) else exc}",
                              BUSY_RETRY_S)
        if not ok:
            return self._refuse(401, "unauthorized", "not a tester account's login", reason="not_a_tester")
        if len(self._testers) > 1000:
            self._testers.clear()
        self._testers[key] = time.monotonic() + TESTER_CACHE_S
        return None

    async def _submit_and_answer(self, request: Request, body: bytes, carrier: str, ok_status: int,
                                 original: float | None = None, *, bad_time: str | None = None) -> JSONResponse:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Outcome] = loop.create_future()
        peer = request.client.host if request.client else None
        now = time.time()
        if bad_time is not None:          # a reject of no device: it claims no dedup key of the device's
            uplink = Uplink(device_id=f"?push/{carrier}", payload=body, transport="http", received_at=now,
                            meta={"peer": peer, replay.BAD_ORIGINAL_TIME: bad_time}, ack=_resolver(loop, done))
        elif original is not None:
            uplink = Uplink(device_id="", payload=body, transport="http", received_at=original,
                            meta={"envelope": carrier, "peer": peer, "replayed_at": round(now, 3)},
                            ack=_resolver(loop, done))
        else:
            uplink = Uplink(device_id="", payload=body, transport="http", received_at=now,
                            meta={"envelope": carrier, "peer": peer}, ack=_resolver(loop, done))
        if not self._try_submit(uplink):
            return self._busy("the gateway's queue is full (backpressure); nothing was taken", BUSY_RETRY_S)
        try:
            outcome = await asyncio.wait_for(asyncio.shield(done), self.settings.http_push_answer_s)
        except TimeoutError:
            return self._busy(f"not committed within {self.settings.http_push_answer_s:g} s; it may still be "
                              "stored, and a retry is then answered as a duplicate", SLOW_RETRY_S)
        self.counters[f"{carrier}.{outcome.status}"] += 1
        if outcome.status != "rejected":
            return JSONResponse({"status": outcome.status}, status_code=ok_status)
        if outcome.reason == "unknown_device":
            return problem(404, "unknown device", "no registered device has this push's IMEI; kept in quarantine",
                           reason=outcome.reason)
        if outcome.reason == "storage":
            return problem(500, "not stored", outcome.detail, reason=outcome.reason)
        if outcome.reason == replay.BAD_ORIGINAL_TIME:
            return problem(422, "original receive time not honoured; kept as a reject", outcome.detail,
                           reason=outcome.reason)
        if outcome.reason == "too_large":        # past its device model's size limit (kept as a reject)
            return problem(413, "payload too large for its device model; kept as a reject", outcome.detail,
                           reason=outcome.reason)
        return problem(422, "push refused by the decoder; kept as a reject", outcome.detail, reason=outcome.reason)

    def _refuse(self, status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
        self.counters[f"refused.{status}"] += 1
        if "reason" in extra:
            self.counters[f"refused.{extra['reason']}"] += 1
        return problem(status, title, detail, **extra)

    def _busy(self, detail: str, retry_after_s: int) -> JSONResponse:
        self.counters["busy"] += 1
        response = problem(503, "gateway busy, retry later", detail, reason="busy")
        response.headers["Retry-After"] = str(retry_after_s)
        return response


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:                        # chunked bodies have no length to check up front
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _basic_login(header: str) -> tuple[str, str] | None:
    """(name, password) of an HTTP Basic `Authorization` header, None for anything else."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        name, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (name, password) if sep and name else None


def _is_tester(url: str, name: str, password: str) -> bool:
    from iotjx.mqtt_accounts import verify_account

    with psycopg.connect(url, connect_timeout=5) as conn:
        return verify_account(conn, name, password, "tester")


def _resolver(loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> Callable[[Outcome], None]:
    """The Uplink's ack (writer thread, after the commit) resolves `done` in the server's loop."""
    def ack(outcome: Outcome) -> None:
        try:
            loop.call_soon_threadsafe(_set, done, outcome)
        except RuntimeError:          # the server stopped meanwhile; the platform pushes again
            pass
    return ack


def _set(done: asyncio.Future, outcome: Outcome) -> None:
    if not done.done():
        done.set_result(outcome)
