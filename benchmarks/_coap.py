"""CoAP load for the ingest benchmark: a bare aiocoap server (the ceiling) and a load generator
that speaks CoAP from many UDP endpoints.

RFC 7252 allows one outstanding confirmable request per peer (NSTART = 1), and aiocoap's client
keeps to it, so one client endpoint never loads a server (../shared/CEILINGS.md).  The generator
opens `endpoints` sockets, each a peer with one CON POST in flight, handles piggybacked and
separate responses (ACKing confirmable ones), and retransmits after ACK_TIMEOUT with backoff.
Requests are encoded here rather than by aiocoap's client (whose per-request cost would make the
load generator the wall on 2 cores); `check_encoding` holds them equal to what aiocoap decodes."""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from _frames import RoundMaker
from _load import own_usage

CON, NON, ACK, RST = 0, 1, 2, 3
POST = 0x02
CHANGED = 0x44                    # 2.04
URI_PATH, CONTENT_FORMAT = 11, 12
OCTET_STREAM = 42
ACK_TIMEOUT = 2.0
MAX_RETRANSMIT = 4


def _option(delta: int, value: bytes) -> bytes:
    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, (n - 269).to_bytes(2, "big")
    d, dext = nibble(delta)
    ln, lext = nibble(len(value))
    return bytes([d << 4 | ln]) + dext + lext + value


def encode_post(mid: int, token: bytes, device_id: str, payload: bytes) -> bytes:
    """A confirmable `POST /up/{device_id}` with Content-Format 42 (application/octet-stream)."""
    head = bytes([0x40 | len(token), POST]) + mid.to_bytes(2, "big") + token
    options = (_option(URI_PATH, b"up") + _option(0, device_id.encode())
               + _option(CONTENT_FORMAT - URI_PATH, bytes([OCTET_STREAM])))
    return head + options + b"\xff" + payload


def check_encoding() -> None:
    """What aiocoap makes of our request (or the benchmark stops)."""
    import aiocoap
    msg = aiocoap.Message.decode(encode_post(0x1234, b"\x01\x02\x03\x04", "869975031234567", b"\x68\x10"))
    assert msg.code == aiocoap.POST and msg.mtype == aiocoap.CON and msg.mid == 0x1234, msg
    assert msg.opt.uri_path == ("up", "869975031234567") and msg.opt.content_format == OCTET_STREAM, msg
    assert msg.payload == b"\x68\x10"


@dataclass(frozen=True, slots=True)
class CoapJob:
    host: str
    port: int
    endpoints: int
    device_ids: tuple[str, ...]
    tmpl: np.ndarray
    base: datetime
    rounds: int


class _Endpoint:
    __slots__ = ("sock", "mid", "token", "datagram", "sent_at", "first_sent", "acked", "tries", "busy")

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((host, port))
        self.sock.setblocking(False)
        self.mid = int.from_bytes(os.urandom(2), "big")
        self.busy = False


def coap_client_worker(job: CoapJob, ready, go, results) -> None:
    """Process entry: send every (device, round) uplink once as CON POST; report rate and latencies."""
    try:
        out = _run_client(job, ready, go)
        results.put({"role": "coap-client", **out, **own_usage()})
    except BaseException as exc:
        ready.release()
        results.put({"role": "coap-client", "error": repr(exc)})


def _run_client(job: CoapJob, ready, go) -> dict:
    maker = RoundMaker(job.tmpl, job.base)
    work = [(d, bytes(row)) for r in range(job.rounds) for d, row in zip(job.device_ids, maker.frames(r))]
    endpoints = [_Endpoint(job.host, job.port) for _ in range(job.endpoints)]
    sel = selectors.DefaultSelector()
    for ep in endpoints:
        sel.register(ep.sock, selectors.EVENT_READ, ep)
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    retransmits = 0
    separate = 0                     # empty ACKs: answers that did not ride on the ACK
    next_work = 0
    token_no = 0
    done = 0
    ready.release()
    go.wait()
    t_first = time.time()

    def send_next(ep: _Endpoint) -> None:
        nonlocal next_work, token_no
        if next_work >= len(work):
            ep.busy = False
            return
        device_id, payload = work[next_work]
        next_work += 1
        token_no += 1
        ep.mid = (ep.mid + 1) & 0xFFFF
        ep.token = token_no.to_bytes(4, "big")
        ep.datagram = encode_post(ep.mid, ep.token, device_id, payload)
        ep.first_sent = ep.sent_at = time.time()
        ep.acked, ep.tries, ep.busy = False, 0, True
        ep.sock.send(ep.datagram)

    def finish(ep: _Endpoint, code: int) -> None:
        nonlocal done
        codes[f"{code >> 5}.{code & 31:02d}"] += 1
        latencies.append(time.time() - ep.first_sent)
        done += 1
        send_next(ep)

    for ep in endpoints:
        send_next(ep)
    last_check = time.time()
    while done < len(work):
        for key, _ in sel.select(0.05):
            ep = key.data
            while True:
                try:
                    data = ep.sock.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if len(data) < 4 or not ep.busy:
                    continue
                mtype, tkl, code, mid = data[0] >> 4 & 3, data[0] & 15, data[1], int.from_bytes(data[2:4], "big")
                token = data[4:4 + tkl]
                if mtype == CON:
                    ep.sock.send(bytes([0x60, 0, data[2], data[3]]))       # ACK a separate response
                if mtype == ACK and mid == ep.mid:
                    if code == 0:
                        ep.acked = True                                      # answer follows separately
                        separate += 1
                    else:
                        finish(ep, code)
                elif mtype in (CON, NON) and code != 0 and token == ep.token:
                    finish(ep, code)
                elif mtype == RST and mid == ep.mid:
                    codes["RST"] += 1
                    finish(ep, 0)
        now = time.time()
        if now - last_check > 0.1:
            last_check = now
            for ep in endpoints:
                if ep.busy and not ep.acked and now - ep.sent_at > ACK_TIMEOUT * 2 ** ep.tries:
                    if ep.tries >= MAX_RETRANSMIT:
                        codes["timeout"] += 1
                        finish(ep, 0)
                        continue
                    ep.tries += 1
                    retransmits += 1
                    ep.sent_at = now
                    ep.sock.send(ep.datagram)
    t_last = time.time()
    for ep in endpoints:
        ep.sock.close()
    return {"requests": len(work), "codes": dict(codes), "retransmits": retransmits, "separate": separate,
            "t_first": t_first,
            "t_last": t_last, "latency": np.array(latencies)}


def bare_coap_server(host: str, port: int, rcvbuf: int, ready, stop) -> None:
    """aiocoap answering 2.04 to any POST without storing anything: the CoAP ceiling."""
    import aiocoap
    import aiocoap.interfaces

    class Changed(aiocoap.interfaces.Resource):
        async def render(self, request):
            return aiocoap.Message(code=aiocoap.CHANGED)

        async def needs_blockwise_assembly(self, request):
            return False

    async def main() -> None:
        ctx = await aiocoap.Context.create_server_context(Changed(), bind=(host, port))
        set_rcvbuf(ctx, rcvbuf)
        ready.release()
        while not stop.is_set():
            await asyncio.sleep(0.2)
        await ctx.shutdown()

    asyncio.run(main())


def set_rcvbuf(ctx, size: int) -> int:
    """Raise SO_RCVBUF of the context's UDP sockets (bursts overflow the default); sockets set."""
    n = 0
    for ri in ctx.request_interfaces:
        mi = getattr(getattr(ri, "token_interface", None), "message_interface", None)
        transport = getattr(mi, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            n += 1
    return n


# --------------------------------------------------------------------------- the phase

def gateway_has_coap() -> str | None:
    """None when the gateway can serve CoAP, else why not."""
    import importlib.util

    from iotjx.settings import Settings
    if importlib.util.find_spec("ingest.coap") is None or "coap_enabled" not in Settings.model_fields:
        return "the gateway has no CoAP server yet (ingest/coap.py, IOTJX_COAP_ENABLED)"
    return None


def _ping(host: str, port: int, timeout: float) -> bool:
    """A CoAP ping (empty CON) answered by RST: the server is up."""
    deadline = time.time() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while time.time() < deadline:
            try:
                s.sendto(bytes([0x40, 0, 0x12, 0x34]), (host, port))
                data, _ = s.recvfrom(64)
                if data[0] >> 4 & 3 == RST:
                    return True
            except (TimeoutError, ConnectionRefusedError, OSError):
                time.sleep(0.2)
    return False


def run_coap(bench, requests: int, clients: int, endpoints: int, target: str, rcvbuf: int = 4 << 20) -> dict:
    """`clients` processes × `endpoints` UDP endpoints POST every uplink once, against the bare
    aiocoap server or the gateway's CoAP ingest (2.04 only after commit)."""
    from _observe import GatewayGroup, Sampler
    from _phases import SPAWN, _rate, _usage_dict, _wait_stored, gateway_env
    from iotjx.broker import free_port

    prefix, base = bench.next_run()
    device_ids = bench.device_ids[:requests] if requests < len(bench.device_ids) else bench.device_ids
    rounds = max(1, requests // len(device_ids))
    port = free_port()
    ready, go, results, stop = SPAWN.Semaphore(0), SPAWN.Event(), SPAWN.Queue(), SPAWN.Event()
    server, gw = None, None
    if target == "bare":
        server = SPAWN.Process(target=bare_coap_server, args=("127.0.0.1", port, rcvbuf, ready, stop), daemon=True)
        server.start()
        if not ready.acquire(timeout=60):
            raise RuntimeError("the bare aiocoap server did not start")
        pids = [server.pid]
    else:
        bench.db.reset()
        bench.listener.clear()
        gw = GatewayGroup(bench.db.url, gateway_env(bench, prefix, shared=False, extra={
            "IOTJX_COAP_ENABLED": "true", "IOTJX_COAP_BIND": f"127.0.0.1:{port}",
            "IOTJX_COAP_REQUIRE_CREDENTIAL": "false", "IOTJX_COAP_RCVBUF": str(rcvbuf)}),
            [f"{prefix}-gw0"], bench.workdir, profile_dir=bench.profile_dir, cmd=bench.gateway_cmd)
        gw.start()
        if not _ping("127.0.0.1", port, 30):
            gw.stop()
            raise RuntimeError("the gateway's CoAP server does not answer a ping")
        pids = gw.pids
    try:
        bounds = np.linspace(0, len(device_ids), clients + 1).astype(int)
        procs = []
        for k in range(clients):
            lo, hi = bounds[k], bounds[k + 1]
            job = CoapJob("127.0.0.1", port, endpoints, tuple(device_ids[lo:hi]), bench.tmpl[lo:hi], base, rounds)
            procs.append(SPAWN.Process(target=coap_client_worker, args=(job, ready, go, results), daemon=True))
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire(timeout=120)
        sampler = Sampler({"server" if target == "bare" else "gateway": pids, "clients": [p.pid for p in procs]},
                          db_url=bench.db.url if gw else None, db_name=bench.db.name if gw else None)
        go.set()
        outs = [results.get(timeout=1800) for _ in procs]
        errors = [o["error"] for o in outs if "error" in o]
        if errors:
            raise RuntimeError(f"CoAP client failed: {errors[0]}")
        stored = _wait_stored(bench, len(device_ids) * rounds) if gw else None
        wall, usage, machine = sampler.stop()
    finally:
        stop.set()
        if server is not None:
            server.join(30)
        if gw is not None:
            gw.stop()
    n = sum(o["requests"] for o in outs)
    codes: Counter[str] = Counter()
    for o in outs:
        codes.update(o["codes"])
    lat = np.concatenate([o["latency"] for o in outs])
    return {"requests": n, "stored": stored, "codes": dict(codes), "retransmits": sum(o["retransmits"] for o in outs),
            "separate": sum(o["separate"] for o in outs),
            "rate": _rate(codes.get("2.04", 0), min(o["t_first"] for o in outs), max(o["t_last"] for o in outs)),
            "latency_ms": (np.percentile(lat, [50, 95, 99]) * 1000).tolist() if len(lat) else [],
            **_usage_dict(wall, usage, machine)}
