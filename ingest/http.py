"""Carrier-platform HTTP push: ``POST /push/ctwing`` and ``POST /push/onenet`` (plus OneNET's GET URL
verification), a small FastAPI app served by uvicorn in a thread of the gateway process.

The body goes to the pipeline untouched as ``Uplink(device_id="", meta={"envelope": …})``: the
pipeline opens the envelope and finds the device by IMEI.  The answer waits for the commit:
CTWing 202, OneNET 200 (OneNET's push manual: anything but 200 makes it push again); a duplicate
(a platform's retry) answers the same.  401 for a missing or wrong token or signature, 413 past
`http_push_max_body`, 422 problem+json for an envelope or payload the decoders refused (kept in
rejected_uplinks), 404 for an IMEI no device has (kept as `unknown_device`), 503 for a carrier
whose token is not configured.

Authentication: CTWing names no push signature in the public record, so the subscription carries
our token, in the header ``X-Push-Token`` or, for a platform form that only takes a URL, the query
``?token=``.  OneNET signs: msg_signature = base64(MD5(token ‖ nonce ‖ msg)), msg as the JSON text
of the ``msg`` member (its string value when it is a string: encrypted pushes)."""

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
from collections import Counter
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from iotjx.model import Outcome, Uplink
from iotjx.settings import Settings, bind_address

log = logging.getLogger(__name__)

CTWING_TOKEN_HEADER = "X-Push-Token"
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


def onenet_verified(body: bytes, token: str) -> bool:
    """True when a OneNET push body carries a valid msg_signature (or `signature`) for `token`."""
    try:
        members = raw_members(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, IndexError, RecursionError):
        return False
    signature = (members.get("msg_signature") or members.get("signature") or (None,))[0]
    nonce = (members.get("nonce") or (None,))[0]
    msg = members.get("msg") or members.get("enc_msg")
    if not isinstance(signature, str) or not isinstance(nonce, str) or msg is None:
        return False
    value, raw = msg
    candidates = [value] if isinstance(value, str) else [raw, json.dumps(value, separators=(",", ":"),
                                                                         ensure_ascii=False)]
    signature = signature.replace(" ", "+")        # a '+' that went through form decoding
    return any(hmac.compare_digest(onenet_signature(token, nonce, c), signature) for c in candidates)


def problem(status: int, title: str, detail: str = "", **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    return JSONResponse({"type": "about:blank", "title": title, "status": status, "detail": detail, **extra},
                        status_code=status, media_type="application/problem+json")


class HttpPushIngest:
    """The push endpoint; `start` returns once it listens (`.port`), `stop` lets requests finish."""

    def __init__(self, settings: Settings, submit: Callable[[Uplink], None]) -> None:
        self.settings = settings
        self._submit = submit
        self.counters: Counter[str] = Counter()
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
        if carrier == "onenet":
            token = self.settings.onenet_push_token
            if not token:
                return self._refuse(503, "onenet push not configured", "set IOTJX_ONENET_PUSH_TOKEN")
            if not onenet_verified(body, token):
                return self._refuse(401, "unauthorized", "msg_signature does not match the token (or is missing)")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Outcome] = loop.create_future()
        peer = request.client.host if request.client else None
        self._submit(Uplink(device_id="", payload=body, transport="http", received_at=time.time(),
                            meta={"envelope": carrier, "peer": peer}, ack=_resolver(loop, done)))
        outcome = await done
        self.counters[f"{carrier}.{outcome.status}"] += 1
        if outcome.status != "rejected":
            return JSONResponse({"status": outcome.status}, status_code=ok_status)
        if outcome.reason == "unknown_device":
            return problem(404, "unknown device", "no registered device has this push's IMEI; kept in quarantine",
                           reason=outcome.reason)
        if outcome.reason == "storage":
            return problem(500, "not stored", outcome.detail, reason=outcome.reason)
        return problem(422, "push refused by the decoder; kept as a reject", outcome.detail, reason=outcome.reason)

    def _refuse(self, status: int, title: str, detail: str) -> JSONResponse:
        self.counters[f"refused.{status}"] += 1
        return problem(status, title, detail)


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
