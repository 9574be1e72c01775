"""`ingest.mqtt.parse_publish` (the gateway's MQTT 3.1.1 PUBLISH fast path) against paho's own
`decode_publish` on generated packets, including truncated and malformed ones."""

from __future__ import annotations

import struct

from hypothesis import given, settings as hsettings, strategies as st
from paho.mqtt._packet import decode_publish
from paho.mqtt.enums import MQTTProtocolVersion

from ingest.mqtt import parse_publish

TOPIC = st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=40))


@st.composite
def publishes(draw):
    qos = draw(st.integers(0, 3))
    command = 0x30 | draw(st.integers(0, 1)) << 3 | qos << 1 | draw(st.integers(0, 1))
    topic = draw(TOPIC)
    packet = struct.pack("!H", len(topic)) + topic
    if qos:
        packet += struct.pack("!H", draw(st.integers(0, 0xFFFF)))
    packet += draw(st.binary(max_size=64))
    cut = draw(st.one_of(st.none(), st.integers(0, len(packet))))
    return command, packet if cut is None else packet[:cut]


@hsettings(max_examples=1500, deadline=None)
@given(publishes())
def test_parse_publish_reads_what_paho_reads_and_leaves_the_rest_to_paho(sample):
    command, packet = sample
    parsed = parse_publish(command, packet)
    try:
        ref = decode_publish(command, packet, MQTTProtocolVersion.MQTTv311)
        topic = ref.topic.decode()
    except Exception:              # paho refuses it (short, empty topic) or its topic cannot be read
        assert parsed is None
        return
    if ref.qos > 1:
        assert parsed is None      # QoS 2 (and the reserved 3) stay paho's
        return
    assert parsed == (topic, ref.payload, ref.mid, ref.qos)
