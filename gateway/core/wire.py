"""Strict checks on raw MQTT 3.1.1 packets from clients, before amqtt parses them.

Receives one packet as (first byte, body) once the shell has framed it (and has
already enforced the size limit); hands on nothing, or raises `ProtocolViolation`.
A violation closes the connection, as Mosquitto does. This closes amqtt's laxness
(AMQTT-NOTES gap 11): invalid UTF-8 or NUL in topics and client ids, SUBSCRIBE with
QoS 3, wrong fixed-header flags, SUBSCRIBE/UNSUBSCRIBE without filters, packets only
a server may send, a second CONNECT. The framing rules the shells share (Remaining
Length, size limit, encoding a packet) live here too, so every listener frames alike.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gateway.core.topics import Topic
from gateway.errors import InvalidValue, ProtocolViolation

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

NAMES = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
}
# Packets a client may send after CONNECT, with their required fixed-header flags
# (None: PUBLISH, whose flags carry DUP/QoS/RETAIN and are checked separately).
_CLIENT_FLAGS: dict[int, int | None] = {
    PUBLISH: None,
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 0b0010,
    PUBCOMP: 0,
    SUBSCRIBE: 0b0010,
    UNSUBSCRIBE: 0b0010,
    PINGREQ: 0,
    DISCONNECT: 0,
}
_FIXED_BODY = {PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, PINGREQ: 0, DISCONNECT: 0}


def violation(message: str) -> ProtocolViolation:
    return ProtocolViolation(message, code="protocol_violation")


MAX_LENGTH_BYTES = 4  # the Remaining Length takes at most four bytes (MQTT 2.2.3)


def decode_remaining_length(encoded: bytes, offset: int = 0) -> tuple[int, int] | None:
    """The Remaining Length at `offset` in `encoded` and the bytes it took; None while more are needed.

    Framing shells ask this of whatever they have buffered (byte by byte or a whole
    chunk), so the rule lives here once. More than four bytes is a violation.
    """
    length, multiplier = 0, 1
    end = min(len(encoded), offset + MAX_LENGTH_BYTES)
    for index in range(offset, end):
        byte = encoded[index]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return length, index + 1 - offset
        multiplier *= 128
    if end - offset >= MAX_LENGTH_BYTES:
        raise violation("remaining length longer than 4 bytes")
    return None


def check_size(length: int, max_bytes: int) -> None:
    """Refuse a packet whose body is larger than the configured limit, before reading it."""
    if length > max_bytes:
        raise violation(f"packet of {length} bytes exceeds the {max_bytes}-byte limit")


def frame_header(buf: bytes, pos: int, max_bytes: int) -> tuple[int, int, int] | None:
    """The packet starting at `pos` in `buf`: (first byte, body start, body end); None while its
    fixed header is incomplete.

    Answers as soon as the header is complete, before the body has arrived (the caller
    compares body end with what it holds), and so refuses an oversize packet, or a
    Remaining Length over four bytes, before its body is read.
    """
    if pos + 1 >= len(buf):
        return None
    second = buf[pos + 1]
    if second < 0x80:  # the common case: a body under 128 bytes, a one-byte length
        length, start = second, pos + 2
    else:
        decoded = decode_remaining_length(buf, pos + 1)
        if decoded is None:
            return None
        length, start = decoded[0], pos + 1 + decoded[1]
    check_size(length, max_bytes)
    return buf[pos], start, start + length


def encode_frame(packet_type: int, flags: int, body: bytes) -> bytes:
    """A packet on the wire: fixed header (type, flags, Remaining Length), then `body`."""
    header = bytearray([(packet_type << 4) | flags])
    length = len(body)
    while True:
        byte, length = length % 128, length // 128
        header.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(header) + body


class _Cursor:
    """Reads MQTT fields from a packet body; any shortfall is a violation."""

    __slots__ = ("body", "pos")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def remaining(self) -> int:
        return len(self.body) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if self.remaining() < n:
            raise violation(f"packet too short for {what}")
        chunk = self.body[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = struct.unpack("!H", self.take(2, what))[0]
        return value

    def text(self, what: str) -> str:
        raw = self.take(self.u16(f"{what} length"), what)
        try:
            value = raw.decode("utf-8", "strict")
        except UnicodeDecodeError as exc:
            raise violation(f"{what} is not valid UTF-8") from exc
        if "\x00" in value:
            raise violation(f"{what} contains NUL")  # MQTT-1.5.3-2
        return value

    def binary(self, what: str) -> bytes:
        return self.take(self.u16(f"{what} length"), what)


@dataclass(frozen=True, slots=True)
class ConnectFields:
    """The claims of a well-formed CONNECT (identity is never taken from here)."""

    protocol_level: int
    client_id: str
    clean_session: bool
    keep_alive: int
    will_topic: str | None


def parse_connect(flags: int, body: bytes) -> ConnectFields:
    """The first packet: must be CONNECT with zero flags and well-formed strings."""
    if flags != 0:
        raise violation("CONNECT fixed-header flags must be 0")
    cur = _Cursor(body)
    cur.text("protocol name")
    level = cur.u8("protocol level")
    connect_flags = cur.u8("connect flags")
    keep_alive = cur.u16("keep alive")
    if connect_flags & 0x01:
        raise violation("CONNECT reserved flag must be 0")  # MQTT-3.1.2-3
    client_id = cur.text("client id")
    will = bool(connect_flags & 0x04)
    will_qos = (connect_flags >> 3) & 0x03
    if not will and (will_qos or connect_flags & 0x20):
        raise violation("will QoS/retain set without the will flag")  # MQTT-3.1.2-13/15
    if will_qos == 3:
        raise violation("will QoS 3 is not allowed")  # MQTT-3.1.2-14
    will_topic = None
    if will:
        will_topic = cur.text("will topic")
        try:
            Topic(will_topic)
        except InvalidValue as exc:
            raise violation(f"bad will topic: {exc.message}") from exc
        cur.binary("will message")
    if connect_flags & 0x80:
        cur.text("user name")
    if connect_flags & 0x40:
        cur.binary("password")
    return ConnectFields(level, client_id, bool(connect_flags & 0x02), keep_alive, will_topic)


def check_packet(packet_type: int, flags: int, body: bytes) -> None:
    """A packet after CONNECT. Raises ProtocolViolation; returns None when acceptable."""
    if packet_type == CONNECT:
        raise violation("a second CONNECT on one connection")  # MQTT-3.1.0-2
    if packet_type not in _CLIENT_FLAGS:
        name = NAMES.get(packet_type, f"reserved type {packet_type}")
        raise violation(f"{name} may not be sent by a client")
    required = _CLIENT_FLAGS[packet_type]
    if required is not None and flags != required:
        raise violation(f"{NAMES[packet_type]} fixed-header flags must be {required:#06b}")
    expected = _FIXED_BODY.get(packet_type)
    if expected is not None and len(body) != expected:
        raise violation(f"{NAMES[packet_type]} must have a {expected}-byte body")
    if packet_type == PUBLISH:
        _check_publish(flags, body)
    elif packet_type == SUBSCRIBE:
        _check_subscribe(body)
    elif packet_type == UNSUBSCRIBE:
        _check_unsubscribe(body)
    elif packet_type in (PUBACK, PUBREC, PUBREL, PUBCOMP) and _packet_id(body) == 0:
        raise violation(f"{NAMES[packet_type]} with packet id 0")


def _packet_id(body: bytes) -> int:
    value: int = struct.unpack("!H", body[:2])[0]
    return value


def publish_qos(flags: int) -> int:
    return (flags >> 1) & 0x03


@dataclass(frozen=True, slots=True)
class PublishFields:
    """A well-formed PUBLISH from a client."""

    topic: str
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    payload: bytes


KNOWN_TOPICS_MAX = 64  # a device publishes to a handful of topics


def parse_publish(flags: int, body: bytes, known_topics: dict[bytes, str] | None = None) -> PublishFields:
    """Check and split a PUBLISH (the hot path: one pass over the header, payload sliced once).

    `known_topics`, if given, is the caller's memo (one per connection) of topic names
    already decoded and checked: raw bytes -> name. A name found there is not checked
    again; a new one that passes is added, up to `KNOWN_TOPICS_MAX` names.
    """
    qos = publish_qos(flags)
    if qos == 3:
        raise violation("PUBLISH with QoS 3")  # MQTT-3.3.1-4
    if qos == 0 and flags & 0x08:
        raise violation("PUBLISH QoS 0 with DUP set")  # MQTT-3.3.1-2
    cur = _Cursor(body)
    end = 2 + cur.u16("topic name length")
    topic = None if known_topics is None else known_topics.get(body[2:end])
    if topic is None:
        cur.pos = 0
        topic = cur.text("topic name")
        try:
            Topic(topic)
        except InvalidValue as exc:
            raise violation(f"bad PUBLISH topic: {exc.message}") from exc  # MQTT-3.3.2-2
        if known_topics is not None and len(known_topics) < KNOWN_TOPICS_MAX:
            known_topics[body[2:end]] = topic
    else:
        cur.pos = end
    packet_id = None
    if qos:
        packet_id = cur.u16("packet id")
        if packet_id == 0:
            raise violation("PUBLISH with packet id 0")
    return PublishFields(topic, qos, bool(flags & 0x01), bool(flags & 0x08), packet_id, body[cur.pos :])


def _check_publish(flags: int, body: bytes) -> None:
    parse_publish(flags, body)


def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    """Check and split a SUBSCRIBE body: packet id and (topic filter, requested QoS) pairs."""
    cur = _Cursor(body)
    packet_id = cur.u16("packet id")
    if packet_id == 0:
        raise violation("SUBSCRIBE with packet id 0")
    if not cur.remaining():
        raise violation("SUBSCRIBE without topic filters")  # MQTT-3.8.3-3
    filters = []
    while cur.remaining():
        topic_filter = cur.text("topic filter")
        if not topic_filter:
            raise violation("empty topic filter")  # MQTT-4.7.3-1
        options = cur.u8("requested QoS")
        if options & 0xFC or options == 3:
            raise violation("SUBSCRIBE requested QoS must be 0, 1 or 2")  # MQTT-3-8.3-4
        filters.append((topic_filter, options))
    return packet_id, filters


def _check_subscribe(body: bytes) -> None:
    parse_subscribe(body)


def _check_unsubscribe(body: bytes) -> None:
    cur = _Cursor(body)
    if cur.u16("packet id") == 0:
        raise violation("UNSUBSCRIBE with packet id 0")
    if not cur.remaining():
        raise violation("UNSUBSCRIBE without topic filters")  # MQTT-3.10.3-2
    while cur.remaining():
        if not cur.text("topic filter"):
            raise violation("empty topic filter")
