"""The CoAP server's datagram front: single-datagram uplinks without aiocoap's per-request machinery.

Nearly every CoAP uplink is one datagram: a CON (or NON) `POST /up/{device_id}` whose answer can
ride on the ACK.  aiocoap, for each of them, decodes every option into objects, keeps the message
ID in a table with its own timer, schedules an empty-ACK timer, runs the resource in a task, and
formats the answer through its pipe and token layers: ~200 µs a request here, one core at ~4,700
requests/s (benchmarks/README.md).  `DatagramFront` reads the server socket in place of aiocoap's
transport and takes those uplinks itself (RFC 7252 message layer, kept to what they need):

* the header and options are parsed here (`parse_uplink`); anything else (GET, block-wise, an
  option not in `FAST_OPTIONS`, ACK, RST, ping, a malformed message) goes to aiocoap unchanged, so
  discovery, Block1/Block2, 4.02 Bad Option and separate-response ACKs stay aiocoap's;
* deduplication (§4.5): a request seen again from the same endpoint with the same message ID
  within EXCHANGE_LIFETIME is not handed on again; a CON duplicate gets the stored answer (or the
  empty ACK sent so far; nothing while neither exists, as aiocoap does).  The table is bounded by
  `recent_max` (~200 bytes an entry): past it the oldest are forgotten first, a retransmission of
  one of them counts as new, and the pipeline's own duplicate detection answers it;
* the answer rides on the ACK (piggybacked, §5.2.1) when it comes within the empty-ACK delay;
  past it an empty ACK is sent (one sweep every `SWEEP_S` for all waiting requests, not a timer
  each) and the answer follows as a separate confirmable response through aiocoap's message
  manager, which retransmits it until the device ACKs (§5.2.2); a NON request gets a NON answer.

Parsing by hand is a deliberate exception to "use the library": `tests/ingest/test_coap_fast.py`
holds it equal to `aiocoap.Message.decode` on generated messages."""

from __future__ import annotations

import logging
import socket
import sys
from collections import Counter, deque
from collections.abc import Callable

import aiocoap
from aiocoap.transports.udp6 import UDP6EndpointAddress
from aiocoap.util.socknumbers import HAS_RECVERR

try:
    from aiocoap.util.socknumbers import MSG_ERRQUEUE
except ImportError:         # not Linux: no error queue to read
    MSG_ERRQUEUE = 0

log = logging.getLogger(__name__)

CON, NON, ACK, RST = 0, 1, 2, 3
POST = 0x02
CHANGED = 0x44                              # 2.04
URI_PATH, CONTENT_FORMAT, URI_QUERY = 11, 12, 15
# Options an uplink may carry and still take this path: Uri-Host (3), Uri-Port (7), Uri-Path,
# Content-Format, Uri-Query, Accept (17), Size1 (60).  Every other option, critical or not, sends
# the request to aiocoap (Block1/Block2, Observe, No-Response, OSCORE, Echo, an unknown one...).
FAST_OPTIONS = frozenset({3, 7, URI_PATH, CONTENT_FORMAT, URI_QUERY, 17, 60})
EXCHANGE_LIFETIME_S = 247.0                 # RFC 7252 §4.8.2, with the default parameters
SWEEP_S = 0.05                              # how often late requests get their empty ACK
READS_PER_WAKE = 64                         # datagrams read per readiness callback


def parse_uplink(data: bytes) -> tuple[int, int, bytes, str, list[str], int | None, bytes] | None:
    """(type, message id, token, device id, Uri-Query values, content format, payload) of a
    single-datagram `POST /up/{device_id}`, or None for anything this path leaves to aiocoap."""
    n = len(data)
    if n < 4:
        return None
    b0 = data[0]
    mtype, tkl = b0 >> 4 & 3, b0 & 15
    if b0 >> 6 != 1 or mtype > NON or tkl > 8 or data[1] != POST:
        return None
    i = 4 + tkl
    if i > n:
        return None
    path: list[bytes] = []
    query: list[str] = []
    content_format = None
    number = 0
    payload = b""
    while i < n:
        byte = data[i]
        if byte == 0xFF:
            payload = data[i + 1:]
            if not payload:                 # a marker without payload is a format error (§3)
                return None
            break
        i += 1
        delta, length = byte >> 4, byte & 15
        if delta >= 13:
            if delta == 13 and i < n:
                delta, i = data[i] + 13, i + 1
            elif delta == 14 and i + 1 < n:
                delta, i = (data[i] << 8 | data[i + 1]) + 269, i + 2
            else:
                return None
        if length >= 13:
            if length == 13 and i < n:
                length, i = data[i] + 13, i + 1
            elif length == 14 and i + 1 < n:
                length, i = (data[i] << 8 | data[i + 1]) + 269, i + 2
            else:
                return None
        number += delta
        if i + length > n or number not in FAST_OPTIONS:
            return None
        if number == URI_PATH:
            path.append(data[i:i + length])
        elif number == URI_QUERY:
            try:
                query.append(data[i:i + length].decode())
            except UnicodeDecodeError:
                return None
        elif number == CONTENT_FORMAT:
            if length > 2:
                return None
            content_format = int.from_bytes(data[i:i + length], "big")
        i += length
    if len(path) != 2 or path[0] != b"up" or not path[1]:
        return None
    try:
        device_id = path[1].decode()
    except UnicodeDecodeError:
        return None
    return mtype, data[2] << 8 | data[3], data[4:4 + tkl], device_id, query, content_format, payload


class Exchange:
    """One request taken by the front, until its answer is sent."""

    __slots__ = ("key", "addr", "ancdata", "mtype", "mid", "token", "t0", "empty_acked", "answered")

    def __init__(self, key, addr, ancdata, mtype: int, mid: int, token: bytes, t0: float) -> None:
        self.key, self.addr, self.ancdata = key, addr, ancdata
        self.mtype, self.mid, self.token, self.t0 = mtype, mid, token, t0
        self.empty_acked = False
        self.answered = False


class DatagramFront:
    """Reads the CoAP server socket in place of aiocoap's transport (`install`): uplinks go to
    `on_uplink(exchange, parsed)`, which answers later with `answer`; the rest to aiocoap."""

    def __init__(self, loop, sock: socket.socket, protocol, message_manager,
                 on_uplink: Callable[[Exchange, tuple], None], empty_ack_delay_s: float, *,
                 counters: Counter | None = None, recent_max: int = 100_000) -> None:
        self._loop = loop
        self._sock = sock
        self._protocol = protocol                   # aiocoap's MessageInterfaceUDP6
        self._manager = message_manager             # aiocoap's MessageManager (MIDs, separate responses)
        self._on_uplink = on_uplink
        self._delay = empty_ack_delay_s
        # (host, port << 16 | MID) -> the waiting exchange, or the answer sent; ~200 bytes an entry
        self._recent: dict[tuple[str, int], Exchange | bytes] = {}
        self._arrivals: deque[tuple[float, list]] = deque()  # keys by arrival, one list per SWEEP_S
        self._recent_max = recent_max
        self._waiting: deque[Exchange] = deque()            # CON requests not yet answered, oldest first
        self._sweeper: Callable | None = None
        # fast_requests: taken here; message_duplicates: retransmissions absorbed; send_errors
        self.counters: Counter[str] = Counter() if counters is None else counters

    def install(self) -> None:
        fd = self._sock.fileno()
        self._loop.remove_reader(fd)
        self._loop.add_reader(fd, self._read_ready)
        self._arrivals.append((self._loop.time(), []))
        self._sweeper = self._loop.call_later(SWEEP_S, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # ------------------------------------------------------------------ receiving
    def _read_ready(self) -> None:
        sock, protocol = self._sock, self._protocol
        if HAS_RECVERR:       # ICMP errors (a departed device) wake the reader too: hand them to aiocoap
            try:
                data, ancdata, flags, addr = sock.recvmsg(4096, 1024, MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                protocol.error_received(exc)
            else:
                protocol.datagram_errqueue_received(data, ancdata, flags, addr)
        for _ in range(READS_PER_WAKE):
            try:
                data, ancdata, flags, addr = sock.recvmsg(4096, 1024)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                protocol.error_received(exc)
                return
            parsed = parse_uplink(data)
            if parsed is None:
                protocol.datagram_msg_received(data, ancdata, flags, addr)
            else:
                self._take(parsed, ancdata, addr)

    def _take(self, parsed, ancdata, addr) -> None:
        mtype, mid = parsed[0], parsed[1]
        key = (sys.intern(addr[0]), addr[1] << 16 | mid)     # one host string for all its entries
        seen = self._recent.get(key)
        if seen is not None:
            self.counters["message_duplicates"] += 1
            if mtype == CON:
                if type(seen) is bytes:
                    self._send(seen, addr, ancdata)
                elif seen.empty_acked:
                    self._send(bytes((0x60, 0, mid >> 8, mid & 255)), addr, ancdata)
            return
        now = self._loop.time()
        if len(ancdata) != 1 or ancdata[0][:2] != (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO):
            pktinfo = _pktinfo(ancdata)      # answer from the address asked, as aiocoap does
            ancdata = [] if pktinfo is None else [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]
        ex = Exchange(key, addr, ancdata, mtype, mid, parsed[2], now)
        self._recent[key] = ex
        self._arrivals[-1][1].append(key)
        if mtype == CON:
            self._waiting.append(ex)
        self.counters["fast_requests"] += 1
        try:
            self._on_uplink(ex, parsed)
        except Exception:
            log.exception("CoAP uplink from %s not handled", addr)
            self.answer(ex, aiocoap.Message(code=aiocoap.INTERNAL_SERVER_ERROR))

    # ------------------------------------------------------------------ answering
    def answer(self, ex: Exchange, message: aiocoap.Message | None = None, code: int = CHANGED) -> None:
        """Send `message` (or an empty-bodied answer with `code`) for `ex`: on the ACK, as a NON,
        or, after an empty ACK, as a separate confirmable response."""
        if ex.answered:
            return
        ex.answered = True
        token = ex.token
        if ex.mtype == CON and not ex.empty_acked:
            if message is None:
                data = bytes((0x60 | len(token), code, ex.mid >> 8, ex.mid & 255)) + token
            else:
                message.mtype, message.mid, message.token = aiocoap.ACK, ex.mid, token
                data = message.encode()
            if self._recent.get(ex.key) is ex:
                self._recent[ex.key] = data              # a retransmitted request gets the same answer
            self._send(data, ex.addr, ex.ancdata)
            return
        if message is None:
            message = aiocoap.Message(code=code)
        message.token = token
        message.remote = UDP6EndpointAddress(ex.addr, self._protocol, pktinfo=_pktinfo(ex.ancdata))
        if ex.mtype == NON:
            message.mtype, message.mid = aiocoap.NON, self._manager._next_message_id()
            self._send(message.encode(), ex.addr, ex.ancdata)
        else:                                # separate response: aiocoap retransmits it until ACKed
            message.mtype = aiocoap.CON
            try:
                self._manager.send_message(message, _ignore_rst)
            except Exception:                 # the device retransmits and gets the empty ACK again
                log.exception("separate CoAP response to %s not sent", ex.addr)

    def _send(self, data: bytes, addr, ancdata) -> None:
        try:
            self._sock.sendmsg((data,), ancdata, 0, addr)
        except OSError as exc:                # the device retransmits; its duplicate is answered then
            self.counters["send_errors"] += 1
            log.debug("CoAP answer to %s not sent: %s", addr, exc)

    def _sweep(self) -> None:
        """Empty ACKs for requests waiting past the delay; forget exchanges past their lifetime."""
        now = self._loop.time()
        waiting, late = self._waiting, now - self._delay
        while waiting:
            ex = waiting[0]
            if not ex.answered:
                if ex.t0 > late:
                    break
                ex.empty_acked = True
                self._send(bytes((0x60, 0, ex.mid >> 8, ex.mid & 255)), ex.addr, ex.ancdata)
            waiting.popleft()
        arrivals, recent, old = self._arrivals, self._recent, now - EXCHANGE_LIFETIME_S
        while arrivals and (arrivals[0][0] < old or len(recent) > self._recent_max):
            for key in arrivals.popleft()[1]:
                recent.pop(key, None)
        arrivals.append((now, []))
        self._sweeper = self._loop.call_later(SWEEP_S, self._sweep)


def _pktinfo(ancdata) -> bytes | None:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return data
    return None


def _ignore_rst() -> None:
    """A device that RSTs a separate response has given up on it; its reading is stored either way."""
