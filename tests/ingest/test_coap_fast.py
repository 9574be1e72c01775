"""The CoAP datagram front (`ingest.coap_fast`): its parser against aiocoap's decoder on generated
messages, and its message layer on the wire with raw datagrams against the real gateway and
PostgreSQL: retransmissions answered alike and stored once, NON answered by NON, a late answer
as an empty ACK then a separate CON that is retransmitted until ACKed, everything else left to
aiocoap."""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import aiocoap
import psycopg
import pytest
from aiocoap.numbers import codes
from aiocoap.optiontypes import OpaqueOption
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

import decoders
from ingest.coap_fast import FAST_OPTIONS, OncePerInterval, format_error, parse_uplink
from ingest.gateway import Gateway
from simulators.water import make_meters
from tests.helpers import register_fleet

# ----------------------------------------------------------------------------- the parser

def _raw(mtype, code, mid: int, token: bytes, payload: bytes) -> aiocoap.Message:
    """A message with the header fields set by hand, as a device's stack would choose them."""
    message = aiocoap.Message(code=code, payload=payload)
    message.mtype, message.mid, message.token = mtype, mid, token
    return message


SEGMENT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def messages(draw):
    """Any request or response aiocoap can encode, biased towards uplink-like POSTs."""
    mtype = draw(st.sampled_from([aiocoap.CON, aiocoap.NON, aiocoap.ACK, aiocoap.RST]))
    code = draw(st.sampled_from([aiocoap.POST, aiocoap.POST, aiocoap.GET, aiocoap.PUT, codes.CHANGED]))
    message = _raw(mtype, code, draw(st.integers(0, 0xFFFF)), draw(st.binary(max_size=8)),
                   draw(st.binary(max_size=40)))
    path = draw(st.one_of(st.tuples(st.just("up"), SEGMENT), st.lists(SEGMENT, max_size=3).map(tuple)))
    message.opt.uri_path = path
    message.opt.uri_query = tuple(draw(st.lists(SEGMENT, max_size=3)))
    if draw(st.booleans()):
        message.opt.content_format = draw(st.integers(0, 0xFFFF))
    if draw(st.booleans()):
        message.opt.uri_host = draw(st.sampled_from(["gw.example", "127.0.0.1"]))
    if draw(st.booleans()):
        message.opt.size1 = draw(st.integers(0, 1 << 20))
    extra = draw(st.sampled_from([None, "block1", "observe", "elective", "critical"]))
    if extra == "block1":
        message.opt.block1 = (0, True, 2)
    elif extra == "observe":
        message.opt.observe = 0
    elif extra in ("elective", "critical"):
        message.opt.add_option(OpaqueOption(65000 if extra == "elective" else 65001, b"x"))
    return message


@hsettings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_parser_takes_exactly_the_single_datagram_uplinks_and_reads_them_as_aiocoap_does(message):
    data = message.encode()
    decoded = aiocoap.Message.decode(data)
    eligible = (decoded.mtype in (aiocoap.CON, aiocoap.NON) and decoded.code == aiocoap.POST
                and len(decoded.opt.uri_path) == 2 and decoded.opt.uri_path[0] == "up"
                and decoded.opt.uri_path[1] != ""
                and all(o.number in FAST_OPTIONS for o in decoded.opt.option_list()))
    parsed = parse_uplink(data)
    if not eligible:
        assert parsed is None
        return
    content_format = None if decoded.opt.content_format is None else int(decoded.opt.content_format)
    assert parsed == (int(decoded.mtype), decoded.mid, decoded.token, decoded.opt.uri_path[1],
                      list(decoded.opt.uri_query), content_format, decoded.payload)


@hsettings(max_examples=1500, deadline=None)
@given(st.binary(min_size=4, max_size=60).map(lambda b: bytes([0x40 | b[0] & 0x1F, 0x02]) + b[1:]))
def test_parser_takes_no_datagram_aiocoap_would_refuse(data):
    """Arbitrary bytes after a CON/NON POST header: whatever the parser takes, aiocoap decodes to
    the same request (anything malformed is left to aiocoap, which answers or drops it)."""
    parsed = parse_uplink(data)
    if parsed is None:
        return
    decoded = aiocoap.Message.decode(data)
    assert decoded.opt.uri_path == ("up", parsed[3]) and decoded.payload == parsed[6]
    assert (decoded.mid, decoded.token, list(decoded.opt.uri_query)) == (parsed[1], parsed[2], parsed[4])


def _aiocoap_decodes(data: bytes) -> bool:
    try:
        aiocoap.Message.decode(data)
    except Exception:          # UnparsableMessage, and the UnicodeDecodeError of a string option
        return False
    return True


@hsettings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_format_error_passes_every_message_aiocoap_encodes(message):
    assert format_error(message.encode()) is None


@hsettings(max_examples=3000, deadline=None)
@given(st.one_of(st.binary(max_size=60),
                 st.binary(min_size=4, max_size=60).map(lambda b: bytes([0x40 | b[0] & 0x3F]) + b[1:]),
                 st.tuples(messages(), st.integers(0, 80), st.binary(min_size=1, max_size=3)).map(
                     lambda t: (lambda d: d[:t[1]] + t[2] + d[t[1] + len(t[2]):])(t[0].encode()))))
def test_format_error_lets_through_only_what_aiocoap_decodes(data):
    """Random bytes, CoAP-like headers and valid messages with bytes overwritten: whatever
    `format_error` passes to aiocoap, aiocoap's decoder takes without raising."""
    if format_error(data) is None:
        assert _aiocoap_decodes(data), data
    elif not _aiocoap_decodes(data):
        assert format_error(data)[0]


def test_once_per_interval_counts_what_it_does_not_log():
    gate = OncePerInterval(interval_s=60, max_sources=2)
    assert [gate.due("a", now=t) for t in (0, 1, 2, 59)] == [0, None, None, None]
    assert gate.due("a", now=61) == 3                   # the next interval: one line, 3 not logged
    assert gate.due("b", now=61) == 0 and gate.due("c", now=61) == 0
    assert gate.due("a", now=62) == 0                   # forgotten past max_sources: logged as new


# ----------------------------------------------------------------------------- on the wire

@pytest.fixture
def fast_gateway(settings, no_thread_leaks):
    gw = Gateway(settings.model_copy(update={"coap_enabled": True, "coap_bind": "127.0.0.1:0",
                                             "coap_require_credential": False,
                                             "coap_empty_ack_delay_s": 0.6}))
    gw.start()
    yield gw
    gw.stop()


class Peer:
    """One device endpoint speaking raw CoAP datagrams (encoded by aiocoap, not by the gateway's code)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(10)

    def post(self, device_id: str, payload: bytes, *, mid: int, token: bytes, mtype=aiocoap.CON,
             extra_option: OpaqueOption | None = None) -> bytes:
        message = _raw(mtype, aiocoap.POST, mid, token, payload)
        message.opt.uri_path = ("up", device_id)
        message.opt.content_format = 42
        if extra_option is not None:
            message.opt.add_option(extra_option)
        data = message.encode()
        self.sock.send(data)
        return data

    def receive(self, timeout: float = 10) -> aiocoap.Message:
        self.sock.settimeout(timeout)
        return aiocoap.Message.decode(self.sock.recv(2048))

    def close(self) -> None:
        self.sock.close()


def _stored(db_url: str) -> Counter:
    with psycopg.connect(db_url) as conn:
        return Counter(conn.execute("SELECT device_id, meter_time FROM water_readings").fetchall())


def _fleet(db_url: str, n: int, seed: int):
    meters = make_meters(register_fleet(db_url, n, seed=seed), seed=seed)
    return meters, [m.frame(datetime(2026, 11, 8, 6, tzinfo=UTC) + timedelta(hours=k)) for k, m in enumerate(meters)]


def test_a_retransmitted_request_is_answered_alike_and_stored_once(fast_gateway, settings):
    meters, frames = _fleet(settings.database_url, 2, seed=41)
    peer = Peer(fast_gateway.coap.port)
    try:
        sent = peer.post(meters[0].device_id, frames[0], mid=0x1234, token=b"\x0a\x0b\x0c")
        first_raw = peer.sock.recv(2048)
        peer.sock.send(sent)                                  # the ACK was "lost": the device sends again
        again_raw = peer.sock.recv(2048)
        # Same message ID from the same endpoint, other content: still a duplicate at the message layer.
        peer.post(meters[1].device_id, frames[1], mid=0x1234, token=b"\x0d")
        third_raw = peer.sock.recv(2048)
        # A new message ID is a new request.
        peer.post(meters[1].device_id, frames[1], mid=0x1235, token=b"\x0e")
        fourth = peer.receive()
    finally:
        peer.close()
    first = aiocoap.Message.decode(first_raw)
    assert (first.mtype, first.code, first.mid, first.token) == (aiocoap.ACK, codes.CHANGED, 0x1234, b"\x0a\x0b\x0c")
    assert again_raw == first_raw and third_raw == first_raw
    assert (fourth.mtype, fourth.code, fourth.mid, fourth.token) == (aiocoap.ACK, codes.CHANGED, 0x1235, b"\x0e")
    expected = Counter((m.device_id, decoders.decode("cjt188", f)["meter_time"]) for m, f in zip(meters, frames))
    assert _stored(settings.database_url) == expected
    assert fast_gateway.pipeline.counters["received.coap"] == 2
    assert fast_gateway.coap.counters["message_duplicates"] == 2


def test_non_confirmable_gets_a_non_answer_with_its_token(fast_gateway, settings):
    meters, frames = _fleet(settings.database_url, 1, seed=42)
    peer = Peer(fast_gateway.coap.port)
    try:
        peer.post(meters[0].device_id, frames[0], mid=0x0101, token=b"\x77\x66", mtype=aiocoap.NON)
        answer = peer.receive()
    finally:
        peer.close()
    assert (answer.mtype, answer.code, answer.token) == (aiocoap.NON, codes.CHANGED, b"\x77\x66")
    assert sum(_stored(settings.database_url).values()) == 1


def test_late_answer_empty_ack_then_separate_con_retransmitted_until_acked(fast_gateway, settings):
    """The commit waits on a lock: after the 0.6 s delay the device gets an empty ACK (and again for
    its retransmission); the 2.04 then comes as a CON with the request's token, is sent again while
    the device does not ACK it, and stops once it does."""
    db = settings.database_url
    meters, frames = _fleet(db, 1, seed=43)
    peer = Peer(fast_gateway.coap.port)
    blocker = psycopg.connect(db)
    try:
        blocker.execute("LOCK TABLE water_readings IN ACCESS EXCLUSIVE MODE")
        sent = peer.post(meters[0].device_id, frames[0], mid=0x2222, token=b"\x01\x02\x03\x04")
        empty = peer.receive()
        peer.sock.send(sent)
        empty_again = peer.receive()
        blocker.rollback()
        separate = peer.receive()
        resent = peer.receive(timeout=15)            # not ACKed: aiocoap retransmits after ACK_TIMEOUT
        peer.sock.send(_raw(aiocoap.ACK, aiocoap.EMPTY, separate.mid, b"", b"").encode())
        with pytest.raises(TimeoutError):
            peer.receive(timeout=8)                   # past the next retransmission time (≥ 4 s)
    finally:
        blocker.close()
        peer.close()
    assert (empty.mtype, empty.code, empty.mid) == (aiocoap.ACK, aiocoap.EMPTY, 0x2222)
    assert (empty_again.mtype, empty_again.code, empty_again.mid) == (aiocoap.ACK, aiocoap.EMPTY, 0x2222)
    assert (separate.mtype, separate.code, separate.token) == (aiocoap.CON, codes.CHANGED, b"\x01\x02\x03\x04")
    assert (resent.mtype, resent.mid, resent.token) == (aiocoap.CON, separate.mid, separate.token)
    assert sum(_stored(db).values()) == 1


def test_other_options_are_left_to_aiocoap(fast_gateway, settings):
    """An unknown elective option: aiocoap serves the uplink (stored, 2.04); an unknown critical
    one: 4.02 Bad Option (RFC 7252 §5.4.1), nothing stored; neither passes through the front."""
    meters, frames = _fleet(settings.database_url, 2, seed=44)
    peer = Peer(fast_gateway.coap.port)
    try:
        peer.post(meters[0].device_id, frames[0], mid=0x0301, token=b"\x31", extra_option=OpaqueOption(65000, b"x"))
        elective = peer.receive()
        peer.post(meters[1].device_id, frames[1], mid=0x0302, token=b"\x32", extra_option=OpaqueOption(65001, b"x"))
        critical = peer.receive()
    finally:
        peer.close()
    assert (elective.code, elective.token) == (codes.CHANGED, b"\x31")
    assert (critical.code, critical.token) == (codes.BAD_OPTION, b"\x32")
    assert Counter(d for d, _ in _stored(settings.database_url).elements()) == Counter([meters[0].device_id])
    counters = fast_gateway.coap.counters
    assert (counters["fast_requests"], counters["requests"], counters["bad_option"]) == (0, 2, 1)


# RFC 7252 §3 format errors, as a device's broken stack or a scanner sends them.
MALFORMED = {
    "reserved_delta": bytes((0x40, 0x02, 0x10, 0x01, 0xF1, 0x00)),           # option delta nibble 15
    "reserved_length": bytes((0x40, 0x02, 0x10, 0x02, 0xBF)),                 # option length nibble 15
    "option_past_end": bytes((0x40, 0x02, 0x10, 0x03, 0xB8)) + b"up",         # 8 announced, 2 there
    "marker_no_payload": bytes((0x40, 0x02, 0x10, 0x04, 0xB2)) + b"up\xff",
    "token_too_long": bytes((0x49, 0x02, 0x10, 0x05)) + b"123456789",
    "non_reserved_delta": bytes((0x50, 0x02, 0x10, 0x06, 0xF1, 0x00)),        # NON: no answer at all
    "path_not_utf8": bytes((0x41, 0x02, 0x10, 0x07, 0x99, 0xB2)) + b"up" + bytes((0x02,)) + b"\xff\xfe\xffx",
}


def test_malformed_datagrams_are_answered_counted_and_logged_once_per_source(fast_gateway, settings, caplog):
    """A CON with a format error gets a Reset with its message ID (§4.2), a NON nothing, a request
    with an unreadable critical option 4.02 (§5.4.1).  Two hosts (one from two ports) send each kind
    20 times a port: 420 counted, 2 log lines (one per host), no traceback; a valid uplink after them
    is stored."""
    caplog.set_level(logging.INFO)
    meters, frames = _fleet(settings.database_url, 1, seed=45)
    peers = [Peer(fast_gateway.coap.port), Peer(fast_gateway.coap.port, source="127.0.0.2"),
             Peer(fast_gateway.coap.port)]            # the third: the first host again, another port
    answers: dict[str, list[bytes]] = {name: [] for name in MALFORMED}
    try:
        for _ in range(20):
            for peer in peers:
                for name, data in MALFORMED.items():
                    peer.sock.send(data)
                    if name != "non_reserved_delta":
                        answers[name].append(peer.sock.recv(2048))
        peers[0].sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            peers[0].sock.recv(2048)                    # nothing for the NON
        peers[0].post(meters[0].device_id, frames[0], mid=0x0401, token=b"\x41")
        stored = peers[0].receive()
    finally:
        for peer in peers:
            peer.close()
    for name, data in MALFORMED.items():
        if name == "path_not_utf8":
            answer = aiocoap.Message.decode(answers[name][0])
            assert (answer.mtype, answer.code, answer.mid, answer.token) == (aiocoap.ACK, codes.BAD_OPTION, 0x1007,
                                                                             b"\x99")
            assert answer.payload == b"option 11: not UTF-8"
        elif name != "non_reserved_delta":
            assert set(answers[name]) == {bytes((0x70, 0, data[2], data[3]))}, name      # Reset, same MID
    assert (stored.code, stored.token) == (codes.CHANGED, b"\x41")
    assert fast_gateway.coap.counters["malformed"] == 3 * 20 * len(MALFORMED)
    lines = [r for r in caplog.records if "malformed CoAP datagram" in r.getMessage()]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    assert not [r for r in caplog.records if r.exc_info or "unparsable" in r.getMessage()]
    assert sum(_stored(settings.database_url).values()) == 1


def test_a_datagram_past_the_read_size_gets_413_with_size1(fast_gateway, settings):
    """Longer than the limit plus room for the header: the read is cut (MSG_TRUNC); a CON request
    still gets 4.13 on its ACK with Size1 = the limit, a NON one a NON 4.13, an ACK nothing."""
    limit = fast_gateway.settings.coap_max_payload
    peer = Peer(fast_gateway.coap.port)
    try:
        peer.post("860000000000001", b"\x68" * (limit + 4000), mid=0x0501, token=b"\x51\x52")
        con = peer.receive()
        peer.post("860000000000001", b"\x68" * (limit + 4000), mid=0x0502, token=b"\x53", mtype=aiocoap.NON)
        non = peer.receive()
        peer.sock.send(_raw(aiocoap.ACK, codes.CHANGED, 0x0503, b"", b"\x00" * (limit + 4000)).encode())
        peer.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            peer.sock.recv(2048)
    finally:
        peer.close()
    assert (con.mtype, con.code, con.mid, con.token, con.opt.size1) == (
        aiocoap.ACK, codes.REQUEST_ENTITY_TOO_LARGE, 0x0501, b"\x51\x52", limit)
    assert (non.mtype, non.code, non.token, non.opt.size1) == (aiocoap.NON, codes.REQUEST_ENTITY_TOO_LARGE,
                                                              b"\x53", limit)
    assert fast_gateway.coap.counters["too_large"] == 3
