"""Small servers that record what the simulators send: an aiocoap server with a POST resource under
/up (in its own thread and event loop, as a gateway runs it) and a threaded HTTP server for pushes.
Each answers like the gateway would (2.04 / 202), or refuses the device ids it is told to refuse."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiocoap
from aiocoap import resource
from aiocoap.numbers import codes


@dataclass(frozen=True, slots=True)
class Received:
    path: str
    query: tuple[str, ...]
    content_format: int | None
    payload: bytes
    confirmable: bool = True
    headers: tuple[tuple[str, str], ...] = ()


class RecordingCoapServer:
    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.received: list[Received] = []
        self.refuse = set(refuse)
        self.port: int | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name="iotjx-test-coap", daemon=True)

    def start(self) -> RecordingCoapServer:
        self._thread.start()
        assert self._ready.wait(10), "test CoAP server did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server = self

        class Up(resource.Resource, resource.PathCapable):
            async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
                device_id = "/".join(request.opt.uri_path)
                fmt = request.opt.content_format
                server.received.append(Received(f"/up/{device_id}", tuple(request.opt.uri_query),
                                                None if fmt is None else int(fmt), request.payload,
                                                request.mtype == aiocoap.CON))
                if device_id in server.refuse:
                    return aiocoap.Message(code=codes.BAD_REQUEST, payload=b"checksum: refused by the test")
                return aiocoap.Message(code=codes.CHANGED)

        async def open_() -> aiocoap.Context:
            site = resource.Site()
            site.add_resource(["up"], Up())
            ctx = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", 0), transports=["udp6"])
            sock = ctx.request_interfaces[0].token_interface.message_interface.transport.get_extra_info("socket")
            self.port = sock.getsockname()[1]
            return ctx

        ctx = loop.run_until_complete(open_())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(ctx.shutdown())
            loop.close()


class RecordingPushServer:
    def __init__(self, status: int = 202) -> None:
        self.received: list[Received] = []
        self.status = status
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"            # keep-alive, as the carrier platforms' pushers

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path, _, query = self.path.partition("?")
                with server._lock:
                    server.received.append(Received(path, (query,) if query else (), None, body,
                                                    headers=tuple(self.headers.items())))
                self.send_response(server.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="iotjx-test-push", daemon=True)

    def start(self) -> RecordingPushServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)
