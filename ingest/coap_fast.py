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

The front also guards what reaches aiocoap.  A datagram is read whole up to the uplink limit plus
`HEADER_ROOM` for header and options (aiocoap's own transport reads 4,096 bytes, which cut a valid
4,887-byte uplink); a longer one is answered 4.13 with Size1 = the limit (RFC 7252 §5.9.2.9,
§5.10.9).  A datagram that is not well-formed CoAP (`format_error`: §3's message format, and
option values aiocoap's decoder cannot read) is counted (`malformed`), logged once per source and
`MALFORMED_LOG_S`, and answered as §4.2/§5.4.1 say: a CON request with an unreadable critical
option gets 4.02 Bad Option, any other CON a Reset, anything else nothing.

Parsing by hand is a deliberate exception to "use the library": `tests/ingest/test_coap_fast.py`
holds `parse_uplink` equal to `aiocoap.Message.decode` on generated messages, and `format_error`
strict enough that aiocoap decodes whatever it lets through."""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

import aiocoap
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import StringOption
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
HEADER_ROOM = 1024                          # header, token and options a datagram may add to its payload
MALFORMED_LOG_S = 60.0                      # one log line per source and this interval for malformed datagrams
# Options whose value aiocoap decodes as UTF-8 (and raises on when it is not).
STRING_OPTIONS = frozenset(int(n) for n in OptionNumber.__members__.values() if n.format is StringOption)
REQUEST_ENTITY_TOO_LARGE, BAD_OPTION = 0x8D, 0x82         # 4.13, 4.02


def _option_field(nibble: int, data: bytes, i: int, n: int) -> tuple[int, int]:
    """An option's delta or length from its 4-bit nibble and the extended bytes at `i` (RFC 7252
    §3.1: 13 → one more byte + 13, 14 → two more bytes + 269), and where the option goes on; (-1, i)
    for the reserved nibble 15 or extended bytes past `n`."""
    if nibble < 13:
        return nibble, i
    if nibble == 13 and i < n:
        return data[i] + 13, i + 1
    if nibble == 14 and i + 1 < n:
        return (data[i] << 8 | data[i + 1]) + 269, i + 2
    return -1, i


def _empty_ack(mid: int) -> bytes:
    """An empty ACK (RFC 7252 §4.2): the request is here, its answer follows separately."""
    return bytes((0x60, 0, mid >> 8, mid & 255))


def _reset(mid: int) -> bytes:
    """A Reset (§4.2): how a confirmable message that cannot be processed is rejected."""
    return bytes((0x70, 0, mid >> 8, mid & 255))


def format_error(data: bytes) -> tuple[str, int | None] | None:
    """Why `data` is not a well-formed CoAP message (RFC 7252 §3) — with the option number when an
    option's value is at fault — or None.  Never looser than aiocoap's decoder: what passes here,
    `aiocoap.Message.decode` decodes without raising."""
    n = len(data)
    if n < 4:
        return "shorter than the 4-byte header", None
    if data[0] >> 6 != 1:
        return f"version {data[0] >> 6} (CoAP is 1)", None
    tkl = data[0] & 15
    if tkl > 8:
        return f"token length {tkl} (at most 8)", None
    if 4 + tkl > n:
        return "token cut short", None
    if data[1] == 0 and n > 4:
        return "an empty message with bytes after its header", None
    i, number = 4 + tkl, 0
    while i < n:
        byte = data[i]
        if byte == 0xFF:
            return ("payload marker without payload", None) if i + 1 == n else None
        delta, i = _option_field(byte >> 4, data, i + 1, n)
        if delta < 0:
            return f"option header after option {number} cut short or reserved", None
        length, i = _option_field(byte & 15, data, i, n)
        if length < 0:
            return f"option {number + delta} length cut short or reserved", None
        number += delta
        if i + length > n:
            return f"option {number} runs past the end", None
        if number in STRING_OPTIONS:
            try:
                data[i:i + length].decode()
            except UnicodeDecodeError:
                return f"option {number} is not UTF-8", number
        i += length
    return None


class OncePerInterval:
    """Which sources to log now: the first event of a source in each `interval_s`, with the number
    of its events not logged since.  At most `max_sources` remembered (the oldest forgotten)."""

    def __init__(self, interval_s: float = MALFORMED_LOG_S, max_sources: int = 10_000) -> None:
        self.interval_s = interval_s
        self._max = max_sources
        self._sources: OrderedDict[str, list] = OrderedDict()       # source -> [logged at, events since]

    def due(self, source: str, now: float | None = None) -> int | None:
        """None: do not log this one; else log it, saying how many were not logged before it."""
        now = time.monotonic() if now is None else now
        entry = self._sources.get(source)
        if entry is not None and now - entry[0] < self.interval_s:
            entry[1] += 1
            return None
        suppressed = 0 if entry is None else entry[1]
        self._sources[source] = [now, 0]
        self._sources.move_to_end(source)
        while len(self._sources) > self._max:
            self._sources.popitem(last=False)
        return suppressed


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
        if delta >= 13:                     # rare: the nibbles are the values in nearly every option
            delta, i = _option_field(delta, data, i, n)
            if delta < 0:
                return None
        if length >= 13:
            length, i = _option_field(length, data, i, n)
            if length < 0:
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
                 counters: Counter | None = None, recent_max: int = 100_000, max_payload: int = 16384) -> None:
        """`max_payload`: the uplink limit; a datagram longer than it plus `HEADER_ROOM` gets 4.13."""
        self._loop = loop
        self._max_payload = max_payload
        self._read_size = max_payload + HEADER_ROOM
        self._malformed_log = OncePerInterval()
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
        # fast_requests: taken here; message_duplicates: retransmissions absorbed; send_errors;
        # malformed: datagrams that are not CoAP; too_large: datagrams past the read size
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
        size = self._read_size
        for _ in range(READS_PER_WAKE):
            try:
                data, ancdata, flags, addr = sock.recvmsg(size, 1024)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                protocol.error_received(exc)
                return
            if flags & socket.MSG_TRUNC:
                self._too_large(data, ancdata, addr)
                continue
            parsed = parse_uplink(data)
            if parsed is None:
                self._pass_on(data, ancdata, flags, addr)
            else:
                self._take(parsed, ancdata, addr)

    def _pass_on(self, data: bytes, ancdata, flags: int, addr) -> None:
        """A datagram that is not a single-datagram uplink: to aiocoap, if it is CoAP at all."""
        problem = format_error(data)
        if problem is None:
            try:
                self._protocol.datagram_msg_received(data, ancdata, flags, addr)
                return
            except Exception as exc:      # aiocoap's decoder refusing what format_error let through
                problem = (f"{type(exc).__name__}: {exc}", None)
        self._malformed(data, ancdata, addr, *problem)

    def _malformed(self, data: bytes, ancdata, addr, why: str, option: int | None) -> None:
        """Count it, log it once per source and interval, and answer it as RFC 7252 §4.2/§5.4.1 say."""
        self.counters["malformed"] += 1
        suppressed = self._malformed_log.due(addr[0])
        if suppressed is not None:
            log.warning("malformed CoAP datagram from %s (%d bytes): %s%s", _host(addr), len(data), why,
                        f" ({suppressed} more from it in the last {MALFORMED_LOG_S:.0f} s not logged)"
                        if suppressed else "")
        if len(data) < 4 or data[0] >> 4 != 4:           # not a CON of version 1: nothing to answer
            return
        mid, tkl = data[2] << 8 | data[3], data[0] & 15
        if option is not None and 1 <= data[1] < 32 and tkl <= 8:
            # A request whose critical option cannot be read: as an unrecognized one, 4.02 (§5.4.1).
            answer = bytes((0x60 | tkl, BAD_OPTION, data[2], data[3])) + data[4:4 + tkl] + b"\xff" + \
                f"option {option}: not UTF-8".encode()
        else:
            answer = _reset(mid)
        self._send(answer, addr, ancdata)

    def _too_large(self, data: bytes, ancdata, addr) -> None:
        """A datagram cut by the read size: a request gets 4.13 with Size1 = the limit; anything else nothing."""
        self.counters["too_large"] += 1
        if len(data) < 4 or data[0] >> 6 != 1 or (data[0] >> 4 & 3) > 1 or not 1 <= data[1] < 32 \
                or (data[0] & 15) > 8:
            return
        message = aiocoap.Message(code=REQUEST_ENTITY_TOO_LARGE,
                                  payload=f"uplinks are limited to {self._max_payload} bytes".encode())
        message.opt.size1 = self._max_payload
        message.token = data[4:4 + (data[0] & 15)]
        if data[0] >> 4 & 3 == CON:
            message.mtype, message.mid = aiocoap.ACK, data[2] << 8 | data[3]
        else:
            message.mtype, message.mid = aiocoap.NON, self._manager._next_message_id()
        self._send(message.encode(), addr, ancdata)

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
                    self._send(_empty_ack(mid), addr, ancdata)
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
                self._send(_empty_ack(ex.mid), ex.addr, ex.ancdata)
            waiting.popleft()
        arrivals, recent, old = self._arrivals, self._recent, now - EXCHANGE_LIFETIME_S
        while arrivals and (arrivals[0][0] < old or len(recent) > self._recent_max):
            for key in arrivals.popleft()[1]:
                recent.pop(key, None)
        arrivals.append((now, []))
        self._sweeper = self._loop.call_later(SWEEP_S, self._sweep)


def _host(addr) -> str:
    """A peer's host as logged: an IPv4-mapped address as IPv4."""
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _pktinfo(ancdata) -> bytes | None:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return data
    return None


def _ignore_rst() -> None:
    """A device that RSTs a separate response has given up on it; its reading is stored either way."""
