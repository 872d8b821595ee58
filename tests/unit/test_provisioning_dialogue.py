"""The MQTT provisioning dialogue in memory: what an anonymous client may send, and what it gets."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import provisioning, wire
from gateway.core.provisioning import Dialogue, End, ProvisionRequest, Redeem, Reply
from gateway.errors import InvalidValue
from gateway.mqtt_client import decode_packet, encode_connect, encode_publish, encode_subscribe, parse_publish

REQUEST = json.dumps({"token": "gwreg_abc", "csr": "-----BEGIN CERTIFICATE REQUEST-----"}).encode()


def frame(packet: bytes) -> tuple[int, int, bytes]:
    """Split a packet our client encoded into (type, flags, body), as the shell frames it."""
    decoded = decode_packet(packet)
    assert decoded is not None
    return decoded[0].type, decoded[0].flags, decoded[0].body


def hello(client_id: str = "") -> bytes:
    return encode_connect(client_id=client_id, keepalive=60, clean_session=True)


def answer_of(data: bytes) -> tuple[str, int, bool, dict[str, str]]:
    """The (topic, QoS, retain, JSON body) of the answer PUBLISH in `data`."""
    decoded = decode_packet(data)
    assert decoded is not None
    message, _ = parse_publish(decoded[0].flags, decoded[0].body)
    return message.topic, message.qos, message.retain, json.loads(message.payload)


def connect(dialogue: Dialogue) -> None:
    outcome = dialogue.receive(*frame(hello()))
    assert outcome == Reply(b"\x20\x02\x00\x00")


def subscribed(*filters: str) -> Dialogue:
    dialogue = Dialogue()
    connect(dialogue)
    dialogue.receive(*frame(encode_subscribe(1, [(f, 1) for f in filters])))
    return dialogue


def publish(dialogue: Dialogue, topic: str, payload: bytes, qos: int = 0) -> object:
    packet = encode_publish(topic, payload, qos=qos, packet_id=9 if qos else None)
    return dialogue.receive(*frame(packet))


def test_a_connect_is_accepted() -> None:
    """A well-formed MQTT 3.1.1 CONNECT gets CONNACK 0 and the dialogue goes on."""
    connect(Dialogue())


def test_a_client_over_its_rate_limit_gets_connack_3() -> None:
    """Over the limit, CONNECT is answered with 'server unavailable' and the dialogue ends."""
    dialogue = Dialogue(over_limit=True)
    outcome = dialogue.receive(*frame(hello("probe")))
    assert outcome == End(
        "rate_limited", "too many provisioning attempts from this address", b"\x20\x02\x00\x03"
    )
    assert dialogue.client_id == "probe"


def test_another_protocol_level_gets_connack_1() -> None:
    """An MQTT 5 CONNECT is refused as an unacceptable protocol version."""
    body = bytearray(frame(hello())[2])
    body[6] = 5  # the protocol level, after the length-prefixed "MQTT"
    outcome = Dialogue().receive(wire.CONNECT, 0, bytes(body))
    assert isinstance(outcome, End)
    assert (outcome.reason, outcome.data) == ("unsupported_protocol", b"\x20\x02\x00\x01")


@pytest.mark.parametrize(
    "packet",
    [wire.encode_frame(wire.PINGREQ, 0, b""), encode_subscribe(1, [("provision/csr/+", 0)])],
    ids=["pingreq", "subscribe"],
)
def test_the_first_packet_must_be_connect(packet: bytes) -> None:
    """Anything before CONNECT ends the connection as a protocol violation, with no reply."""
    outcome = Dialogue().receive(*frame(packet))
    assert isinstance(outcome, End)
    assert (outcome.reason, outcome.data) == ("protocol_violation", b"")


def test_only_the_answer_topics_may_be_subscribed() -> None:
    """The three answer filters are granted at QoS 0; every other filter gets 0x80."""
    dialogue = Dialogue()
    connect(dialogue)
    filters = [
        "provision/csr/accepted",
        "provision/csr/rejected",
        "provision/csr/+",
        "provision/csr/other",
        "provision/csr",
        "provision/#",
        "gateway/#",
        "devices/#",
        "#",
        "+/csr/accepted",
    ]
    outcome = dialogue.receive(*frame(encode_subscribe(5, [(f, 1) for f in filters])))
    assert outcome == Reply(b"\x90" + bytes([2 + len(filters)]) + b"\x00\x05" + bytes([0, 0, 0] + [0x80] * 7))


@pytest.mark.parametrize(
    "filters", [["provision/csr/+"], ["provision/csr/accepted", "provision/csr/rejected"]]
)
@pytest.mark.parametrize("qos", [0, 1])
def test_a_request_after_subscribing_to_both_answers_is_redeemed(filters: list[str], qos: int) -> None:
    """With both answers subscribed, a request is handed on; QoS 1 brings its PUBACK first."""
    outcome = publish(subscribed(*filters), "provision/csr", REQUEST, qos)
    assert isinstance(outcome, Redeem)
    assert (outcome.request.token, outcome.request.csr) == (
        "gwreg_abc",
        "-----BEGIN CERTIFICATE REQUEST-----",
    )
    assert outcome.data == (b"\x40\x02\x00\x09" if qos else b"")


@pytest.mark.parametrize("filters", [[], ["provision/csr/accepted"], ["provision/csr/rejected"]])
def test_a_request_whose_answer_could_not_be_delivered_is_not_redeemed(filters: list[str]) -> None:
    """Without subscriptions for both answers the request is dropped unread, so its token stays unused."""
    dialogue = subscribed(*filters) if filters else Dialogue()
    if not filters:
        connect(dialogue)
    outcome = publish(dialogue, "provision/csr", REQUEST, 1)
    assert isinstance(outcome, End)
    assert (outcome.reason, outcome.data) == ("not_subscribed", b"")


@pytest.mark.parametrize(
    "topic", ["gateway/events/device", "devices/dev-1/readings", "provision/csr/accepted", "provision"]
)
def test_publishing_anywhere_but_the_request_topic_ends_the_connection(topic: str) -> None:
    """A publish to any other topic ends the dialogue without an answer."""
    outcome = publish(subscribed("provision/csr/+"), topic, b"{}", 1)
    assert isinstance(outcome, End)
    assert (outcome.reason, outcome.data) == ("topic_forbidden", b"")


def test_a_qos_2_request_is_refused() -> None:
    """Requests use QoS 0 or 1; QoS 2 ends the dialogue."""
    outcome = publish(subscribed("provision/csr/+"), "provision/csr", REQUEST, 2)
    assert isinstance(outcome, End)
    assert outcome.reason == "qos_unsupported"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"token": "t"}',
        b'{"token": "t", "csr": "c", "extra": 1}',
        b'{"token": 1, "csr": "c"}',
        b'{"token": "", "csr": "c"}',
        json.dumps({"token": "t" * 201, "csr": "c"}).encode(),
    ],
)
def test_an_unreadable_request_is_answered_on_rejected(payload: bytes) -> None:
    """A payload that is not {"token", "csr"} gets its PUBACK and an invalid_request answer."""
    outcome = publish(subscribed("provision/csr/+"), "provision/csr", payload, 1)
    assert isinstance(outcome, End)
    assert outcome.reason == "invalid_request"
    assert outcome.data.startswith(b"\x40\x02\x00\x09")
    topic, qos, _, body = answer_of(outcome.data[4:])
    assert (topic, qos, body["code"]) == ("provision/csr/rejected", 0, "invalid_request")


@pytest.mark.parametrize(
    "packet",
    [
        wire.encode_frame(wire.UNSUBSCRIBE, 2, b"\x00\x01" + struct.pack("!H", 1) + b"a"),
        wire.encode_frame(wire.PUBREL, 2, b"\x00\x01"),
        wire.encode_frame(wire.PUBACK, 0, b"\x00\x01"),
    ],
    ids=["unsubscribe", "pubrel", "puback"],
)
def test_any_other_packet_ends_the_connection(packet: bytes) -> None:
    """Packets outside the grammar end the dialogue without a reply."""
    dialogue = Dialogue()
    connect(dialogue)
    outcome = dialogue.receive(*frame(packet))
    assert isinstance(outcome, End)
    assert (outcome.reason, outcome.data) == ("packet_forbidden", b"")


def test_a_second_connect_is_a_protocol_violation() -> None:
    """CONNECT after CONNECT ends the dialogue."""
    dialogue = Dialogue()
    connect(dialogue)
    outcome = dialogue.receive(*frame(hello()))
    assert isinstance(outcome, End)
    assert outcome.reason == "protocol_violation"


def test_pingreq_is_answered_and_disconnect_is_no_failure() -> None:
    """PINGREQ gets PINGRESP; DISCONNECT ends the dialogue without counting as a refusal."""
    dialogue = Dialogue()
    connect(dialogue)
    assert dialogue.receive(wire.PINGREQ, 0, b"") == Reply(b"\xd0\x00")
    outcome = dialogue.receive(wire.DISCONNECT, 0, b"")
    assert isinstance(outcome, End)
    assert (outcome.reason, outcome.failure) == ("client_disconnect", False)


def test_nothing_is_read_after_the_dialogue_ended() -> None:
    """One request per connection: after an End the dialogue refuses to go on."""
    dialogue = Dialogue()
    connect(dialogue)
    dialogue.receive(wire.DISCONNECT, 0, b"")
    with pytest.raises(RuntimeError):
        dialogue.receive(wire.PINGREQ, 0, b"")


def test_the_answers_are_qos_0_publishes_on_their_topics() -> None:
    """accepted and rejected answers carry the contract's fields as JSON on their topics."""
    topic, qos, retain, body = answer_of(
        provisioning.accepted_answer("dev-1", "CERT", "CA", "0a", "2030-01-01T00:00:00Z")
    )
    assert (topic, qos, retain) == ("provision/csr/accepted", 0, False)
    assert body == {
        "device_id": "dev-1",
        "certificate": "CERT",
        "ca_chain": "CA",
        "certificate_serial": "0a",
        "not_after": "2030-01-01T00:00:00Z",
    }
    topic, _, _, body = answer_of(provisioning.rejected_answer("token_used", "already used"))
    assert (topic, body) == ("provision/csr/rejected", {"code": "token_used", "message": "already used"})


def test_a_request_never_shows_its_token_or_csr() -> None:
    """The request's repr hides both secrets, so a stray log line cannot carry them."""
    request = ProvisionRequest.from_payload(REQUEST)
    assert "gwreg_abc" not in repr(request)
    assert "BEGIN" not in repr(request)


@given(st.binary(max_size=200))
def test_any_payload_gives_a_request_or_invalid_value(payload: bytes) -> None:
    """Property: arbitrary request payloads parse or raise InvalidValue, nothing else."""
    try:
        request = ProvisionRequest.from_payload(payload)
    except InvalidValue as exc:
        error = exc
    else:
        assert request.token
        assert request.csr
        return
    assert error.code == "invalid_request"


@given(st.lists(st.tuples(st.integers(0, 15), st.integers(0, 15), st.binary(max_size=40)), max_size=6))
def test_any_packet_sequence_gives_an_outcome_never_an_exception(
    packets: list[tuple[int, int, bytes]],
) -> None:
    """Property: whatever a client sends, the dialogue answers with an outcome and ends at most once."""
    dialogue = Dialogue()
    for index, packet in enumerate([frame(hello()), *packets]):
        outcome = dialogue.receive(*packet)
        assert isinstance(outcome, Reply | Redeem | End), index
        if not isinstance(outcome, Reply):
            return
