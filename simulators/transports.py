"""Sending uplink records as the field does: MQTT (QoS 1 on ``{prefix}/up/{device_id}``), CoAP
(``POST coap://HOST/up/{device_id}``, content-format 42, confirmable) and carrier HTTP push (the JSON
envelope POSTed to the push URL of its carrier).  Each channel answers every record with an `Answer`:
acknowledged (PUBACK, 2.xx), refused (an error code: the server said no) or failed (no answer)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from .capture import UplinkRecord
from .publish import MqttPublisher

CONTENT_FORMAT_OCTET_STREAM = 42


@dataclass(frozen=True, slots=True)
class Answer:
    status: str                           # acknowledged | refused | failed
    detail: str = ""


ACK = Answer("acknowledged")
SIMULATOR_TOKEN_SECRET = "iotjx-simulator"


def coap_token(device_id: str, secret: str = SIMULATOR_TOKEN_SECRET) -> str:
    """A simulated device's CoAP token (``?t=``), derived from its id so that a capture can be replayed
    into a fresh system whose registration set the same tokens (24 URI-safe characters)."""
    digest = hashlib.blake2b(f"{secret}:{device_id}".encode(), digest_size=18).digest()
    return base64.urlsafe_b64encode(digest).decode()


@dataclass(frozen=True, slots=True)
class Targets:
    """Where each transport sends: the broker, the CoAP server, the carrier push URL."""

    mqtt_host: str | None = None
    mqtt_port: int = 1883
    mqtt_prefix: str = "iotjx"
    mqtt_protocol: str = "3.1.1"
    mqtt_username: str | None = None      # a tester account (service listener): it may publish for any device
    mqtt_password: str | None = None
    coap_url: str | None = None           # coap://host:port; records go to {coap_url}/up/{device_id}
    push_url: str | None = None           # http://host:port/push/{carrier}; {carrier} is ctwing / onenet
    push_headers: tuple[tuple[str, str], ...] = ()
    coap_token_secret: str | None = SIMULATOR_TOKEN_SECRET     # None: no ?t= token on CoAP requests
    coap_endpoints: int = 64              # client sockets: aiocoap keeps one CON in flight per peer (NSTART 1)
    http_connections: int = 16
    timeout_s: float = 95.0               # > CoAP's MAX_TRANSMIT_WAIT (93 s): the exchange's own limit first

    @classmethod
    def from_settings(cls, settings, *, coap_url: str | None = None, push_url: str | None = None,
                      push_headers: tuple[tuple[str, str], ...] = ()) -> Targets:
        """Targets from iotjx settings: the broker of IOTJX_MQTT_URL (with IOTJX_MQTT_USERNAME/PASSWORD, a
        tester account on a secured broker), the gateway's CoAP server at
        IOTJX_COAP_BIND and its push endpoint at IOTJX_HTTP_PUSH_BIND (with IOTJX_CTWING_PUSH_TOKEN as
        the CTWing header) — unless given explicitly."""
        from iotjx.settings import bind_address

        host, port = settings.mqtt_host_port if settings.mqtt_url else (None, 1883)
        local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
        coap_host, coap_port = bind_address(settings.coap_bind)
        push_host, push_port = bind_address(getattr(settings, "http_push_bind", settings.api_bind))
        headers = dict(push_headers)
        ctwing_token = getattr(settings, "ctwing_push_token", None)
        if ctwing_token and "X-Push-Token" not in headers:
            headers["X-Push-Token"] = ctwing_token     # ingest/http.py: CTWing pushes carry our token
        return cls(mqtt_host=host, mqtt_port=port, mqtt_prefix=settings.mqtt_topic_prefix,
                   mqtt_protocol=settings.mqtt_protocol, mqtt_username=getattr(settings, "mqtt_username", None),
                   mqtt_password=getattr(settings, "mqtt_password", None),
                   coap_url=coap_url or f"coap://{local.get(coap_host, coap_host)}:{coap_port}",
                   push_url=push_url or f"http://{local.get(push_host, push_host)}:{push_port}/push/{{carrier}}",
                   push_headers=tuple(headers.items()))


class MqttChannel:
    """One MQTT connection for all devices (as a device gateway or a carrier bridge publishes).  With
    `original_times`, each record goes to ``{prefix}/replay/{device}`` with its original receive
    time (`record.t`) and transport in front (`ingest.replay`): the gateway (IOTJX_REPLAY_ENABLED)
    stores it as it arrived then.  Only a tester account may write there; the broker drops anyone
    else's."""

    def __init__(self, targets: Targets, client_id: str, *, original_times: bool = False) -> None:
        self._original_times = original_times
        if targets.mqtt_host is None:
            raise ValueError("no broker to send MQTT records to (IOTJX_MQTT_URL)")
        self._publisher = MqttPublisher(targets.mqtt_host, targets.mqtt_port, prefix=targets.mqtt_prefix,
                                        client_id=client_id, protocol=targets.mqtt_protocol,
                                        username=targets.mqtt_username, password=targets.mqtt_password)

    async def send(self, record: UplinkRecord) -> Answer:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()

        def acked(ok: bool, detail: str) -> None:
            loop.call_soon_threadsafe(_settle, answer, ACK if ok else Answer("refused", detail))

        if self._original_times:
            from ingest import replay

            frame = replay.pack(record.t, record.payload, replay.origin_code(record.transport, record.route))
            self._publisher.publish(record.device_id or "push", frame, on_ack=acked, kind="replay")
        else:
            self._publisher.publish(record.device_id, record.payload, on_ack=acked)
        return await answer

    async def close(self) -> None:
        await asyncio.to_thread(self._publisher.flush, 10)
        self._publisher.close()


def _settle(future: asyncio.Future, answer: Answer) -> None:
    if not future.done():
        future.set_result(answer)


class CoapChannel:
    """Confirmable POSTs from a pool of client endpoints; a device always uses the same endpoint, so
    its uplinks keep their order."""

    def __init__(self, targets: Targets) -> None:
        if targets.coap_url is None:
            raise ValueError("no CoAP server to send records to")
        self._base = targets.coap_url.rstrip("/")
        self._secret = targets.coap_token_secret
        self._n = max(1, targets.coap_endpoints)
        self._timeout = targets.timeout_s
        self._contexts: list = []
        self._opening: asyncio.Lock | None = None

    async def open(self) -> None:
        import aiocoap

        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:                  # the first sends all arrive here together: open once
            if not self._contexts:
                self._contexts = [await aiocoap.Context.create_client_context(transports=["udp6"])
                                  for _ in range(self._n)]

    async def send(self, record: UplinkRecord) -> Answer:
        import aiocoap

        if not self._contexts:
            await self.open()
        context = self._contexts[zlib.crc32(record.device_id.encode()) % self._n]
        query = f"?t={coap_token(record.device_id, self._secret)}" if self._secret else ""
        request = aiocoap.Message(code=aiocoap.POST, uri=f"{self._base}/up/{record.device_id}{query}",
                                  payload=record.payload, content_format=CONTENT_FORMAT_OCTET_STREAM)
        try:
            response = await asyncio.wait_for(context.request(request).response, self._timeout)
        except (asyncio.TimeoutError, aiocoap.error.Error, OSError) as exc:
            return Answer("failed", f"{type(exc).__name__}: {exc}")
        if response.code.is_successful():
            return ACK
        return Answer("refused", f"{response.code.dotted} {response.payload[:200].decode('utf-8', 'replace')}")

    async def close(self) -> None:
        for context in self._contexts:
            await context.shutdown()
        self._contexts = []


class HttpChannel:
    """Carrier pushes: POST the JSON envelope, keep-alive connections from a small thread pool (the
    standard library's client; a push is one small request).  With `original_times`, each push
    carries its original receive time (`record.t`, header ``X-Iotjx-Received-At``) and the tester's
    login (HTTP Basic: `targets.mqtt_username` / `mqtt_password`), as `ingest.http` honours them."""

    def __init__(self, targets: Targets, *, original_times: bool = False) -> None:
        if targets.push_url is None:
            raise ValueError("no push URL to send carrier records to")
        self._template = targets.push_url
        self._headers = {"Content-Type": "application/json", **dict(targets.push_headers)}
        self._original_times = original_times
        if original_times:
            if not targets.mqtt_username or not targets.mqtt_password:
                raise ValueError("pushes with their original times need the tester's login (IOTJX_MQTT_USERNAME and "
                                 "IOTJX_MQTT_PASSWORD)")
            login = f"{targets.mqtt_username}:{targets.mqtt_password}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(login).decode()
        self._timeout = targets.timeout_s
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=max(1, targets.http_connections),
                                        thread_name_prefix="iotjx-push")
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    async def send(self, record: UplinkRecord) -> Answer:
        url = self._template.replace("{carrier}", record.route or "push")
        headers = self._headers
        if self._original_times:
            from ingest.replay import TIME_HEADER

            headers = {**headers, TIME_HEADER: repr(float(record.t))}
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._post, url, record.payload, headers)

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        conn = getattr(self._local, "conns", {}).get(key)
        for attempt in (1, 2):            # a keep-alive connection the server closed: reconnect once
            if conn is None:
                cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                conn = cls(parts.hostname, parts.port, timeout=self._timeout)
                self._local.__dict__.setdefault("conns", {})[key] = conn
                with self._lock:
                    self._connections.append(conn)
            try:
                path = parts.path + (f"?{parts.query}" if parts.query else "")
                conn.request("POST", path or "/", body=body, headers=headers)
                response = conn.getresponse()
                text = response.read()[:200].decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conns.pop(key, None)
                conn = None
                if attempt == 2:
                    return Answer("failed", f"{type(exc).__name__}: {exc}")
                continue
            if 200 <= response.status < 300:
                return ACK
            return Answer("refused", f"{response.status} {text}")
        return Answer("failed", "unreachable")

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
