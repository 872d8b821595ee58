"""Strict checks on raw client packets (AMQTT-NOTES gap 11), with a property test."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import wire
from gateway.errors import ProtocolViolation


def s(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


def connect_body(
    client_id: bytes = b"dev-1", flags: int = 0x02, will: tuple[bytes, bytes] | None = None
) -> bytes:
    body = s(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + s(client_id)
    if will is not None:
        body += s(will[0]) + s(will[1])
    return body


def test_a_good_connect_is_parsed() -> None:
    """Client id, clean session and keep-alive come out of a well-formed CONNECT."""
    fields = wire.parse_connect(0, connect_body())
    assert (fields.client_id, fields.clean_session, fields.keep_alive, fields.will_topic) == (
        "dev-1",
        True,
        60,
        None,
    )


@pytest.mark.parametrize(
    ("flags", "body"),
    [
        (1, connect_body()),  # fixed-header flags
        (0, connect_body(flags=0x03)),  # reserved bit
        (0, connect_body(client_id=b"\xff\xfe")),  # invalid UTF-8 client id
        (0, connect_body(client_id=b"a\x00b")),  # NUL
        (0, connect_body(flags=0x06, will=(b"a/#", b"x"))),  # wildcard will topic
        (0, connect_body(flags=0x1E, will=(b"a", b"x"))),  # will QoS 3
        (0, connect_body(flags=0x22)),  # will retain without will flag
        (0, connect_body()[:7]),  # truncated
    ],
)
def test_bad_connects_are_violations(flags: int, body: bytes) -> None:
    """Malformed CONNECTs are refused before amqtt sees them."""
    with pytest.raises(ProtocolViolation):
        wire.parse_connect(flags, body)


def publish(topic: bytes, qos: int = 0, packet_id: int = 1, payload: bytes = b"x") -> tuple[int, bytes]:
    body = s(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return qos << 1, body


@pytest.mark.parametrize(
    "topic",
    [b"a/\xff", b"a\x00b", b"a/+", b"a/#", b"", b"\xed\xa0\x80"],  # last: UTF-16 surrogate in UTF-8
)
def test_publish_with_a_bad_topic_is_a_violation(topic: bytes) -> None:
    """Invalid UTF-8, NUL, wildcards or an empty topic close the connection (MQTT-3.3.2-2, 1.5.3)."""
    flags, body = publish(topic)
    with pytest.raises(ProtocolViolation):
        wire.check_packet(wire.PUBLISH, flags, body)


def test_publish_rules_on_qos_dup_and_packet_id() -> None:
    """QoS 3, DUP on QoS 0 and packet id 0 are violations; a normal publish passes."""
    flags, body = publish(b"devices/d/readings", qos=1)
    wire.check_packet(wire.PUBLISH, flags, body)
    with pytest.raises(ProtocolViolation):
        wire.check_packet(wire.PUBLISH, 0b0110, body)
    with pytest.raises(ProtocolViolation):
        wire.check_packet(wire.PUBLISH, 0b1000, publish(b"a")[1])
    with pytest.raises(ProtocolViolation):
        wire.check_packet(wire.PUBLISH, *publish(b"a", qos=1, packet_id=0))


def subscribe(*filters: tuple[bytes, int], packet_id: int = 1) -> bytes:
    return struct.pack("!H", packet_id) + b"".join(s(f) + bytes([q]) for f, q in filters)


@pytest.mark.parametrize(
    ("flags", "body"),
    [
        (0b0010, subscribe((b"a", 3))),  # QoS 3
        (0b0010, subscribe((b"a", 0x41))),  # reserved bits
        (0b0000, subscribe((b"a", 0))),  # flags 0
        (0b0010, subscribe()),  # no filters
        (0b0010, subscribe((b"", 0))),  # empty filter
        (0b0010, subscribe((b"\xc3\x28", 0))),  # invalid UTF-8
        (0b0010, subscribe((b"a", 0), packet_id=0)),
    ],
)
def test_bad_subscribes_are_violations(flags: int, body: bytes) -> None:
    """SUBSCRIBE with QoS 3, flags 0, no filters, bad strings: all close the connection."""
    with pytest.raises(ProtocolViolation):
        wire.check_packet(wire.SUBSCRIBE, flags, body)


def test_a_subscribe_with_a_syntactically_wrong_filter_passes_to_the_acl() -> None:
    """'a/#/b' is well-formed UTF-8: it is refused in SUBACK (0x80), not by closing."""
    wire.check_packet(wire.SUBSCRIBE, 0b0010, subscribe((b"a/#/b", 1)))


@pytest.mark.parametrize(
    "packet_type", [0, 15, wire.CONNACK, wire.SUBACK, wire.UNSUBACK, wire.PINGRESP, wire.CONNECT]
)
def test_packets_a_client_may_not_send(packet_type: int) -> None:
    """Reserved types, server-only packets and a second CONNECT are violations."""
    with pytest.raises(ProtocolViolation):
        wire.check_packet(packet_type, 0, b"")


def test_fixed_size_packets() -> None:
    """PINGREQ has no body, PUBACK exactly a non-zero packet id, PUBREL flags 0010."""
    wire.check_packet(wire.PINGREQ, 0, b"")
    wire.check_packet(wire.PUBACK, 0, b"\x00\x01")
    with pytest.raises(ProtocolViolation):
        wire.check_packet(wire.PINGREQ, 0, b"x")
    with pytest.raises(ProtocolViolation):
        wire.check_packet(wire.PUBACK, 0, b"\x00\x00")
    with pytest.raises(ProtocolViolation):
        wire.check_packet(wire.PUBREL, 0, b"\x00\x01")


@given(st.integers(0, 15), st.integers(0, 15), st.binary(max_size=64))
def test_any_packet_is_accepted_or_a_violation(packet_type: int, flags: int, body: bytes) -> None:
    """Property: arbitrary bytes give None or ProtocolViolation, never another exception."""
    try:
        wire.check_packet(packet_type, flags, body)
    except ProtocolViolation:
        pass


@given(st.integers(0, 15), st.binary(max_size=80))
def test_any_connect_is_parsed_or_a_violation(flags: int, body: bytes) -> None:
    """Property: arbitrary CONNECT bodies give fields or ProtocolViolation, nothing else."""
    try:
        fields = wire.parse_connect(flags, body)
    except ProtocolViolation:
        return
    assert isinstance(fields.client_id, str)


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (b"\x00", (0, 1)),
        (b"\x7f", (127, 1)),
        (b"\x80\x01", (128, 2)),
        (b"\xff\x7f", (16_383, 2)),
        (b"\xff\xff\xff\x7f", (268_435_455, 4)),
        (b"\x05rest-of-packet", (5, 1)),
    ],
)
def test_the_remaining_length_is_decoded(encoded: bytes, expected: tuple[int, int]) -> None:
    """The examples of MQTT 3.1.1 section 2.2.3 decode to their length and size."""
    assert wire.decode_remaining_length(encoded) == expected


@pytest.mark.parametrize("encoded", [b"", b"\x80", b"\xff\xff", b"\xff\xff\xff"])
def test_an_unfinished_remaining_length_asks_for_more(encoded: bytes) -> None:
    """While every byte so far carries the continuation bit (up to three), the answer is None."""
    assert wire.decode_remaining_length(encoded) is None


def test_a_remaining_length_past_four_bytes_is_a_violation() -> None:
    """A fourth byte with the continuation bit set breaks the four-byte limit."""
    with pytest.raises(ProtocolViolation, match="longer than 4 bytes"):
        wire.decode_remaining_length(b"\xff\xff\xff\xff")


def test_a_packet_over_the_size_limit_is_a_violation() -> None:
    """The size check refuses a body one byte over the limit and accepts one at it."""
    wire.check_size(1024, 1024)
    with pytest.raises(ProtocolViolation, match="exceeds the 1024-byte limit"):
        wire.check_size(1025, 1024)


@given(st.integers(0, 15), st.integers(0, 15), st.binary(max_size=300))
def test_an_encoded_frame_decodes_to_itself(packet_type: int, flags: int, body: bytes) -> None:
    """Property: the header encode_frame writes decodes to the body's length, byte by byte."""
    frame = wire.encode_frame(packet_type, flags, body)
    assert frame[0] == (packet_type << 4) | flags
    encoded = b""
    for byte in frame[1:]:
        encoded += bytes([byte])
        if (decoded := wire.decode_remaining_length(encoded)) is not None:
            break
    assert decoded == (len(body), len(encoded))
    assert frame[1 + len(encoded) :] == body


@given(st.binary(max_size=8))
def test_any_length_prefix_is_decoded_or_a_violation(encoded: bytes) -> None:
    """Property: arbitrary bytes give a length, None or ProtocolViolation, nothing else."""
    try:
        decoded = wire.decode_remaining_length(encoded)
    except ProtocolViolation:
        return
    if decoded is not None:
        assert 0 <= decoded[0] <= 268_435_455
        assert 1 <= decoded[1] <= 4


def test_a_subscribe_is_split_into_filters() -> None:
    """parse_subscribe hands on the packet id and each filter with its requested QoS."""
    body = struct.pack("!H", 7) + s(b"a/+") + b"\x01" + s(b"b/#") + b"\x00"
    assert wire.parse_subscribe(body) == (7, [("a/+", 1), ("b/#", 0)])


def _outcome(flags: int, body: bytes, memo: dict[bytes, str] | None) -> object:
    try:
        return wire.parse_publish(flags, body, memo)
    except ProtocolViolation as exc:
        return ("violation", exc.message)


@given(st.lists(st.tuples(st.sampled_from([0, 2, 3, 4, 8, 10]), st.binary(max_size=24)), max_size=30))
def test_the_topic_memo_never_changes_an_answer(packets: list[tuple[int, bytes]]) -> None:
    """Property: with one memo across many packets, parse_publish answers exactly as without it."""
    topics = [s(b"devices/d1/readings"), s(b"a/b"), s(b"a/+"), s(b"a\x00b"), s(b"\xff"), b"\x00"]
    memo: dict[bytes, str] = {}
    for index, (flags, tail) in enumerate(packets):
        body = topics[index % len(topics)] + tail
        assert _outcome(flags, body, memo) == _outcome(flags, body, None)
    assert set(memo.values()) <= {"devices/d1/readings", "a/b"}  # only names that passed


def test_the_topic_memo_is_bounded() -> None:
    """The memo keeps at most KNOWN_TOPICS_MAX names; later names are still checked and accepted."""
    memo: dict[bytes, str] = {}
    for n in range(wire.KNOWN_TOPICS_MAX + 10):
        fields = wire.parse_publish(0, s(f"t/{n}".encode()) + b"x", memo)
        assert fields.topic == f"t/{n}"
    assert len(memo) == wire.KNOWN_TOPICS_MAX
