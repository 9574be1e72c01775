"""MQTT transport: paho in its network thread, uplinks handed to the pipeline, PUBACK after commit.

Topic scheme: devices publish on ``{prefix}/up/{device_id}`` (QoS 1); commands for a device go to
``{prefix}/down/{device_id}``.  The registry, not the topic, says what the device is.

At scale (docs/ingest.md):
- *Persistent session.*  MQTT 5: clean start off and a session expiry; MQTT 3.1.1: clean session
  off.  What we have not acknowledged, the broker keeps for our client id and redelivers when we
  come back — so a replica must always come back under its own client id.
- *Shared subscription.*  With `mqtt_shared_group` set, replicas subscribe to
  ``$share/{group}-{tag}/{prefix}/up/+`` and the broker splits the stream between them.
- *Identity.*  The client id and the group carry an HMAC tag of a secret (`Settings.
  mqtt_session_client_id`, `mqtt_share_group`): Mosquitto checks neither a client id nor a
  subscription against its ACL, so a client that knew them could take the session or join the
  group (the broker then drops what it deals to a member its ACL forbids).  With
  `mqtt_identity_property` (MQTT 5) an uplink whose topic names a device other than the user name
  the broker put in that user property is refused: kept as a reject under ``?{topic}``, never
  stored as that device (docs/broker-security.md).
- *Reconnect.*  paho reconnects with exponential backoff (1 s … 30 s); every CONNACK subscribes
  again (harmless when the session kept the subscription, necessary when it did not).
- *Protocol.*  3.1.1 by default: paho costs ~1.4 x more per message with MQTT 5 (a `Properties`
  object per packet); the broker's configuration gives 3.1.1 what 5's CONNECT properties would.
- *Flow control.*  An uplink is acknowledged only when committed or spooled.  MQTT 5's Receive
  Maximum (the broker sends at most that many unacknowledged messages) is set to the pipeline's
  queue size, and for 3.1.1 the broker's `max_inflight_messages` plays that role, so the broker —
  not our memory — holds what we cannot take yet, and paho's network thread rarely blocks in `submit`.  When it does (the queue is shared with CoAP and HTTP), it
  stops reading the socket; the broker queues.  A block longer than 1.5 × keep-alive makes the
  broker drop the connection; paho reconnects and the broker redelivers what was unacknowledged.
- *Acks never cross connections.*  The writer thread acknowledges through paho's outgoing queue
  (no lock shared with the network thread, so no deadlock).  A PUBACK is sent only on the
  connection that delivered the message: after a reconnect the broker resends what it has not seen
  acknowledged, with packet ids it may reuse for other messages, so a stale PUBACK could acknowledge
  the wrong one.  The resent copy is a duplicate for the pipeline, and its PUBACK goes out.
- *Replays.*  With `replay_enabled` the gateway also takes ``{prefix}/replay/{device_id}``, which
  only tester accounts may write (broker ACL): each message carries its uplink's original receive
  time and transport (`ingest.replay`), used as the uplink's `received_at`.  Those messages reach
  `_on_uplink` through its odd-topic branch, so the uplinks' path pays nothing for them."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotjx.model import Outcome, Uplink
from iotjx.settings import Settings

from . import replay

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600   # the broker keeps our session (and unacked messages) a week
RECEIVE_MAXIMUM = 65535            # MQTT 5's ceiling for unacknowledged messages in flight to us
KEEPALIVE_S = 30


def make_client(settings: Settings, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """The one place that turns settings into a paho client (not yet connected)."""
    v5 = settings.mqtt_protocol == "5"
    client = FastClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else False,
        manual_ack=manual_ack,
    )
    if settings.mqtt_username:
        client.username_pw_set(settings.mqtt_username, settings.mqtt_password)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_inflight_messages_set(1000)
    return client


class FastClient(mqtt.Client):
    """paho's client, reading its socket through a buffer.

    Stock paho reads a packet with three `recv` calls (command byte, length, body) and one `select`
    per packet: at QoS 1 rates that is most of its network thread.  Here one `recv` takes up to
    64 KiB, the packets in it are handled in one pass, and `pending()` tells paho's loop not to wait
    in `select` while buffered bytes remain (the hook paho has for TLS sockets).  With `read_gate`
    it reads only while the consumer has room; with `on_uplink` an MQTT 3.1.1 PUBLISH at QoS 0/1
    skips paho's MQTTMessage.  Overrides protected methods of paho 2.2 (`_create_socket`,
    `_handle_publish`, `_handle_on_message`; `loop_read` calls `_packet_read`, reads `_in_packet`),
    hence the pin in pyproject.toml; every MQTT test runs through it."""

    _filtered = False         # message_callback_add used: paho's topic matching is needed
    # `read_gate(timeout)`: False while the consumer has no room for another message (it may wait
    # up to `timeout` for some); the network thread then reads nothing and keeps writing instead.
    read_gate: Callable[[float], bool] | None = None
    # `after_read()`: called after each read burst (what on_message collected can be handed on at once).
    after_read: Callable[[], None] | None = None
    # `on_uplink(topic, payload, mid, qos)`: MQTT 3.1.1 QoS 0/1 messages, instead of on_message.
    on_uplink: Callable[[str, bytes, int, int], None] | None = None

    def _create_socket(self):  # noqa: ANN202 - paho's own signature
        return _BufferedSocket(super()._create_socket())

    def message_callback_add(self, sub: str, callback) -> None:  # noqa: ANN001
        self._filtered = True
        super().message_callback_add(sub, callback)

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        # An MQTT 3.1.1 PUBLISH at QoS 0 or 1 goes to `on_uplink` as (topic, payload, mid, qos):
        # paho would build an MQTTMessage (with a threading.Condition in its MQTTMessageInfo), format
        # a debug line and call on_message under its callback lock, ~25 % of its thread here.
        on_uplink = self.on_uplink
        if on_uplink is None or self._filtered or self._protocol == mqtt.MQTTv5:
            return super()._handle_publish()
        parsed = parse_publish(self._in_packet["command"], self._in_packet["packet"])
        if parsed is None:                   # QoS 2, an empty or non-UTF-8 topic, a short packet: paho's
            return super()._handle_publish()
        try:
            on_uplink(*parsed)
        except Exception as err:
            self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
            if not self.suppress_exceptions:
                raise
        if parsed[3] == 1 and not self._manual_ack:
            return self._send_puback(parsed[2])
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        # paho matches every message's topic against the per-topic callbacks (a generator over its
        # topic tree) even when there are none: ~10 % of the network thread here.
        if self._filtered:
            super()._handle_on_message(message)
            return
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        gate = self.read_gate
        if gate is not None and not gate(_GATE_WAIT_S):
            # No room for another message: read nothing, so that paho's loop goes on to write (the
            # PUBACKs of committed batches, which free the broker's window) and comes back.
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        try:
            rc = super().loop_read(max_packets)
            sock = self._sock
            # Handle what the last recv brought in, without a select per packet (bounded, so writes —
            # our PUBACKs — and keep-alive get their turn).
            for _ in range(_READ_BURST):
                if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None or self._sock is not sock \
                        or not sock.buffered or (gate is not None and not gate(0)):
                    break
                rc = self._packet_read()
                if rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN:
                    return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
                if rc > 0:
                    return self._loop_rc_handle(rc)
            return rc
        finally:
            if self.after_read is not None:
                self.after_read()


def parse_publish(command: int, packet: bytes) -> tuple[str, bytes, int, int] | None:
    """(topic, payload, packet id, QoS) of an MQTT 3.1.1 PUBLISH (`command`: the fixed header's first
    byte; `packet`: what follows the remaining length), or None for what paho should decode: QoS 2,
    an empty topic (a protocol error), a topic that is not UTF-8, a packet too short to hold its
    header (MQTT 3.1.1 §3.3)."""
    qos = (command & 0x06) >> 1
    if qos > 1 or len(packet) < 2:
        return None
    end = 2 + (packet[0] << 8 | packet[1])
    if end == 2 or len(packet) < end + (2 if qos else 0):
        return None
    try:
        topic = packet[2:end].decode()
    except UnicodeDecodeError:
        return None
    if qos:
        return topic, packet[end + 2:], packet[end] << 8 | packet[end + 1], 1
    return topic, packet[end:], 0, 0


_READ_BURST = 256
_GATE_WAIT_S = 0.002      # how long a closed read gate holds the network thread before it writes again
_RECV_BYTES = 65536


class _BufferedSocket:
    """A socket whose `recv` is served from one larger read; everything else is the socket's."""

    __slots__ = ("_sock", "_buf", "_pos")

    def __init__(self, sock) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._buf):
            data = self._sock.recv(max(bufsize, _RECV_BYTES))   # BlockingIOError / b"" (EOF) as the socket's
            if len(data) <= bufsize:
                return data
            self._buf, self._pos = data, 0
        start = self._pos
        self._pos = min(start + bufsize, len(self._buf))
        return self._buf[start:self._pos]

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return self.buffered + inner

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def connect_properties(settings: Settings, receive_maximum: int = RECEIVE_MAXIMUM) -> Properties | None:
    if settings.mqtt_protocol != "5":
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    props.ReceiveMaximum = max(1, min(RECEIVE_MAXIMUM, receive_maximum))
    return props


class MqttIngest:
    """Subscribes to the uplink topic with a persistent session and feeds the pipeline."""

    def __init__(self, settings: Settings, submit: Callable[[Uplink], None], *,
                 ack_flush: Callable[[Callable[[], None]], None] | None = None,
                 read_gate: Callable[[float], bool] | None = None,
                 submit_many: Callable[[list[Uplink]], None] | None = None) -> None:
        """`ack_flush`, when given (`Pipeline.add_ack_flush`), registers `flush_acks` to run after each
        batch's acks: PUBACKs are then buffered and written together, once per batch.  `read_gate`
        (`Pipeline.wait_room`): messages are read only while `submit` has room, so paho's network
        thread never blocks in `submit` and keeps writing PUBACKs while the queue is full.
        `submit_many`: the messages of one read burst (≤ 257) go to it together instead of one by one
        to `submit`."""
        self._settings = settings
        self._submit = submit
        self._prefix = f"{settings.mqtt_topic_prefix}/up/"
        self._client = make_client(settings, settings.mqtt_session_client_id, manual_ack=True)
        self._identity = settings.mqtt_identity_property
        self._replay_prefix = f"{settings.mqtt_topic_prefix}/replay/" if settings.replay_enabled else None
        if read_gate is not None:
            self._client.read_gate = read_gate
        self._submit_many = submit_many
        self._burst: list[Uplink] = []             # this read burst's uplinks, for `submit_many`
        if submit_many is not None:
            self._client.after_read = self._submit_burst
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_uplink = self._on_uplink
        self._stopping = False
        self._paused = False
        self._generation = 0                 # bumped when a connection ends: acks of older ones are dropped
        self._ack_lock = threading.Lock()
        self._batched = ack_flush is not None
        self._acks: deque[tuple[int, int]] = deque()  # (mid, generation) waiting for flush_acks
        if ack_flush is not None:
            ack_flush(self.flush_acks)
        self._subscribe_mid: int | None = None
        self.connected = threading.Event()         # connected *and* subscribed: uplinks can flow
        self._disconnected = threading.Event()
        self.counters = {"messages": 0, "bad_topic": 0, "reconnects": 0, "stale_acks": 0, "left_for_redelivery": 0,
                         "identity_refused": 0,
                         "replayed": 0, "replay_refused": 0}

    @property
    def client(self) -> mqtt.Client:
        return self._client

    def start(self) -> None:
        host, port = self._settings.mqtt_host_port
        kwargs = {}
        if self._settings.mqtt_protocol == "5":
            kwargs = {"clean_start": False,
                      "properties": connect_properties(self._settings, self._settings.queue_max)}
        self._client.connect_async(host, port, keepalive=KEEPALIVE_S, **kwargs)
        self._client.loop_start()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """True once connected and the broker granted the subscription."""
        return self.connected.wait(timeout)

    def pause(self) -> None:
        """Stop handing new messages to the pipeline but stay connected, so that what the pipeline
        still holds can be acknowledged on this connection while it drains (then `stop`).  Messages
        that arrive meanwhile are not acknowledged: the broker redelivers them to our session."""
        self._paused = True

    def stop(self) -> None:
        """Stop reading; what is in flight and unacknowledged the broker redelivers to our session."""
        self._stopping = True
        self._disconnected.clear()
        self._client.disconnect()
        # Let the network thread send DISCONNECT and close the socket before it is stopped: a socket
        # left open would hold the session until the broker's keep-alive gives up on it.
        self._disconnected.wait(5)
        self._client.loop_stop()
        self.connected.clear()

    # paho callbacks run in its network thread: keep them short, never raise.
    def _on_connect(self, client: mqtt.Client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        filters = [self._settings.uplink_topic_filter]
        if self._replay_prefix is not None:
            filters.append(self._settings.replay_topic_filter)
        if len(filters) > 1:
            _, self._subscribe_mid = client.subscribe([(f, 1) for f in filters])
        else:
            _, self._subscribe_mid = client.subscribe(filters[0], qos=1)
        log.info("connected to %s, subscribing to %s (session present: %s)", self._settings.mqtt_url,
                 ", ".join(filters), flags.session_present)

    def _on_subscribe(self, client: mqtt.Client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            # e.g. 0x9E: the broker does not support shared subscriptions
            log.error("broker refused the subscription to %s: %s", self._settings.uplink_topic_filter, refused[0])
            return
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._disconnected.set()
        with self._ack_lock:
            self._generation += 1
        if self._stopping:
            log.info("disconnected from the broker (stopping)")
        elif self.connected.is_set():
            log.warning("disconnected from the broker: %s; paho reconnects with backoff", reason_code)
            self.counters["reconnects"] += 1
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata, msg: mqtt.MQTTMessage) -> None:
        """paho's callback (MQTT 5, QoS 2); 3.1.1 messages at QoS 0/1 come to `_on_uplink` directly."""
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.error("PUBLISH with a topic that is not UTF-8 (%d bytes): not taken", len(msg.payload))
            return
        if self._identity:
            self._on_uplink(topic, msg.payload, msg.mid, msg.qos, identity_of(msg, self._identity))
        else:
            self._on_uplink(topic, msg.payload, msg.mid, msg.qos)

    def _on_uplink(self, topic: str, payload: bytes, mid: int, qos: int, identity: str | None = None) -> None:
        if self._paused:
            self.counters["left_for_redelivery"] += 1
            return
        try:
            device_id = topic[len(self._prefix):] if topic.startswith(self._prefix) else ""
            if "/" in device_id:
                device_id = ""
            if qos == 0:
                ack = _nothing
            elif self._batched:              # the writer threads append, `flush_acks` takes (no lock each)
                ack = _QueuedAck(self._acks.append, (mid, self._generation))
            else:
                ack = _PubAck(self, mid, self._generation)
            meta = _NO_META
            if not device_id:
                if self._replay_prefix is not None and topic.startswith(self._replay_prefix):
                    self._take(self._replayed(topic, payload, ack))
                    return
                self.counters["bad_topic"] += 1
                meta = {"topic": topic}
            elif self._identity and identity != device_id:
                # Not the device it says it is: kept as a reject of no device, never stored as that one.
                self.counters["identity_refused"] += 1
                device_id, meta = "", {"topic": topic, "authenticated_as": identity}
            # The topic says nothing the row does not when it names the device: only odd ones are kept.
            uplink = Uplink(device_id=device_id or f"?{topic}", payload=payload, transport="mqtt",
                            received_at=time.time(), meta=meta, ack=ack)
            if self._submit_many is not None:
                self._burst.append(uplink)
            else:
                self._submit(uplink)
            self.counters["messages"] += 1
        except Exception:
            log.exception("uplink on %s (%d bytes) could not be queued", topic, len(payload))

    def _replayed(self, topic: str, frame: bytes, ack: Callable[[Outcome], None]) -> Uplink:
        """A replay message's uplink: stamped with its original receive time and transport, or — time
        out of bounds, header unreadable, odd topic — a reject of no device (`bad_original_time`) at
        the gateway's clock, under ``?{topic}`` so that it claims no dedup key of the device."""
        now = time.time()
        device_id = topic[len(self._replay_prefix):]
        try:
            if not device_id or "/" in device_id:
                raise replay.ReplayFrameError("the replay topic names no device")
            received_at, origin, payload = replay.unpack(frame, now, self._settings.replay_max_ahead_s)
        except replay.ReplayFrameError as exc:
            self.counters["replay_refused"] += 1
            return Uplink(device_id=f"?{topic}", payload=frame, transport="mqtt",
                          received_at=now, ack=ack,
                          meta={"topic": topic, replay.BAD_ORIGINAL_TIME: str(exc)})
        self.counters["replayed"] += 1
        transport, envelope = replay.ORIGINS[origin]
        meta: dict = {"replayed_at": round(now, 3)}
        if envelope is not None:        # a carrier push: the pipeline finds the device in the envelope
            meta["envelope"] = envelope
            device_id = ""
        return Uplink(device_id=device_id, payload=payload, transport=transport, received_at=received_at,
                      meta=meta, ack=ack)

    def _take(self, uplink: Uplink) -> None:
        if self._submit_many is not None:
            self._burst.append(uplink)
        else:
            self._submit(uplink)
        self.counters["messages"] += 1

    def _submit_burst(self) -> None:
        """After each read burst (paho's network thread): its uplinks to the pipeline at once."""
        if not self._burst:
            return
        burst, self._burst = self._burst, []
        try:
            self._submit_many(burst)
        except Exception:      # not queued, not acknowledged: the broker redelivers them
            log.exception("%d uplinks could not be queued", len(burst))

    def _puback(self, mid: int, generation: int) -> None:
        # Rejected uplinks are committed too (rejects table): every outcome is acknowledged.
        with self._ack_lock:
            if generation != self._generation:
                self.counters["stale_acks"] += 1      # the broker resends it on the new connection
                return
            self._client.ack(mid, 1)

    def flush_acks(self) -> None:
        """Send the buffered PUBACKs of the current connection as one write (4 bytes each, the same
        packets `client.ack` would queue one by one); acks of an ended connection are dropped."""
        with self._ack_lock:             # more than one writer thread flushes
            n = len(self._acks)
            if not n:
                return
            take = self._acks.popleft
            acks = [take() for _ in range(n)]
            mids = [mid for mid, generation in acks if generation == self._generation]
            self.counters["stale_acks"] += len(acks) - len(mids)
            if not mids:
                return
            queue_packet = getattr(self._client, "_packet_queue", None)
            if queue_packet is None:            # not paho 2.x: one ack at a time
                for mid in mids:
                    self._client.ack(mid, 1)
                return
            # PUBACK: fixed header 0x40, remaining length 2, packet id (MQTT 3.1.1 §3.4; in MQTT 5,
            # §3.4.2.1, a PUBACK of reason Success without properties is the same 4 bytes).
            packets = (np.asarray(mids, dtype=np.uint32) | np.uint32(0x40020000)).astype(">u4").tobytes()
            queue_packet(PUBACK, packets, 0, 0)


def identity_of(msg: mqtt.MQTTMessage, name: str) -> str | None:
    """The value of the MQTT 5 user property `name` (the publisher's user name, as the broker put
    it), or None when the message has none."""
    for key, value in getattr(msg.properties, "UserProperty", None) or ():
        if key == name:
            return value
    return None


class _QueuedAck:
    """An uplink's ack when PUBACKs are batched: (mid, generation) queued for `flush_acks`."""

    __slots__ = ("_append", "_item")

    def __init__(self, append: Callable[[tuple[int, int]], None], item: tuple[int, int]) -> None:
        self._append = append
        self._item = item

    def __call__(self, outcome: Outcome) -> None:
        self._append(self._item)


class _PubAck:
    """An uplink's ack: PUBACK on the connection that delivered it (slotted: one per message)."""

    __slots__ = ("_ingest", "_mid", "_generation")

    def __init__(self, ingest: MqttIngest, mid: int, generation: int) -> None:
        self._ingest = ingest
        self._mid = mid
        self._generation = generation

    def __call__(self, outcome: Outcome) -> None:
        self._ingest._puback(self._mid, self._generation)


_NO_META: dict = {}


def _nothing(outcome) -> None:
    return None
