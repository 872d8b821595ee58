"""The MQTT provisioning dialogue: everything an anonymous client may do, in one place.

Receives the packets of one connection to the provisioning listener, framed and in
order (type, flags, body); hands on what to write back and when to stop, as
`Reply`, `Redeem` or `End`. No I/O, no clock: the shell (`gateway.provisioning`)
reads, writes, enforces time limits and redeems the request with `DeviceService`.

The whole grammar (DESIGN.md §6 provisioning, over MQTT 3.1.1); anything else ends
the connection without an answer:

- CONNECT first (protocol level 4; others get CONNACK 1; a client over its rate
  limit gets CONNACK 3, "server unavailable", before it sends a token);
- SUBSCRIBE to ``provision/csr/accepted``, ``provision/csr/rejected`` or
  ``provision/csr/+``, granted at QoS 0; any other filter gets 0x80;
- one PUBLISH to ``provision/csr``, QoS 0 or 1 (PUBACK for 1), payload
  ``{"token", "csr"}``, once both answer topics are subscribed: a request whose
  answer could not be delivered is not redeemed, so its token stays unused;
- PINGREQ, DISCONNECT.

The answer is one QoS 0 PUBLISH on ``provision/csr/accepted``
(``{"device_id", "certificate", "ca_chain", "certificate_serial", "not_after"}``, as
the HTTPS endpoint) or ``provision/csr/rejected`` (``{"code", "message"}``); then
the connection is closed.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field

from gateway.core import wire
from gateway.errors import InvalidValue, ProtocolViolation

REQUEST_TOPIC = "provision/csr"
ACCEPTED_TOPIC = "provision/csr/accepted"
REJECTED_TOPIC = "provision/csr/rejected"
ANSWER_TOPICS = frozenset({ACCEPTED_TOPIC, REJECTED_TOPIC})
# The only filters granted, and the answer topics each one delivers.
SUBSCRIBE_GRANTS: dict[str, frozenset[str]] = {
    ACCEPTED_TOPIC: frozenset({ACCEPTED_TOPIC}),
    REJECTED_TOPIC: frozenset({REJECTED_TOPIC}),
    "provision/csr/+": ANSWER_TOPICS,
}
MQTT_3_1_1 = 4
CONNACK_ACCEPTED, CONNACK_BAD_PROTOCOL, CONNACK_SERVER_UNAVAILABLE = 0, 1, 3
SUBACK_FAILURE = 0x80
MAX_TOKEN_CHARS = 200  # as the HTTPS endpoint
# How a dialogue may end without a failure; every other `End.reason` is a refusal.
CLIENT_DISCONNECT, PROVISIONED = "client_disconnect", "provisioned"
RATE_LIMITED = "rate_limited"


class _State(enum.Enum):
    AWAIT_CONNECT = "await_connect"
    CONNECTED = "connected"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class ProvisionRequest:
    """A well-formed request: a token and a CSR, both non-empty text (vetted further by the CA)."""

    token: str = field(repr=False)  # a secret: never in a repr, never logged
    csr: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not 1 <= len(self.token) <= MAX_TOKEN_CHARS:
            raise InvalidValue(f"token must be 1-{MAX_TOKEN_CHARS} characters", code="invalid_request")
        if not isinstance(self.csr, str) or not self.csr:
            raise InvalidValue("csr must be a non-empty PEM string", code="invalid_request")

    @classmethod
    def from_payload(cls, payload: bytes) -> ProvisionRequest:
        """Parse ``{"token", "csr"}`` (no other keys); anything else is `InvalidValue`."""
        try:
            body = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
            raise InvalidValue("payload is not UTF-8 JSON", code="invalid_request") from exc
        if not isinstance(body, dict) or set(body) != {"token", "csr"}:
            raise InvalidValue('payload must be {"token", "csr"}', code="invalid_request")
        return cls(body["token"], body["csr"])


@dataclass(frozen=True, slots=True)
class Reply:
    """Write `data` and read the next packet."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Redeem:
    """Write `data` (the PUBACK, if any), redeem `request`, send the answer, close."""

    request: ProvisionRequest
    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    """Write `data` (possibly an answer or a refusing CONNACK), then close; `reason` names why."""

    reason: str
    message: str
    data: bytes = b""

    @property
    def failure(self) -> bool:
        return self.reason not in (CLIENT_DISCONNECT, PROVISIONED)


Outcome = Reply | Redeem | End


def connack(code: int) -> bytes:
    return wire.encode_frame(wire.CONNACK, 0, bytes([0, code]))


def answer(topic: str, body: dict[str, str]) -> bytes:
    """One QoS 0 PUBLISH on `topic` carrying `body` as compact JSON."""
    name = topic.encode("utf-8")
    payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
    return wire.encode_frame(wire.PUBLISH, 0, struct.pack("!H", len(name)) + name + payload)


def accepted_answer(
    device_id: str, certificate: str, ca_chain: str, certificate_serial: str, not_after: str
) -> bytes:
    return answer(
        ACCEPTED_TOPIC,
        {
            "device_id": device_id,
            "certificate": certificate,
            "ca_chain": ca_chain,
            "certificate_serial": certificate_serial,
            "not_after": not_after,
        },
    )


def rejected_answer(code: str, message: str) -> bytes:
    return answer(REJECTED_TOPIC, {"code": code, "message": message})


class Dialogue:
    """One connection's state: feed it every packet with `receive`; obey what it returns."""

    def __init__(self, *, over_limit: bool = False) -> None:
        self._state = _State.AWAIT_CONNECT
        self._over_limit = over_limit
        self._answers: set[str] = set()  # answer topics the client's subscriptions deliver
        self.client_id: str | None = None

    def receive(self, packet_type: int, flags: int, body: bytes) -> Outcome:
        if self._state is _State.DONE:
            raise RuntimeError("the dialogue is over; the connection must be closed")
        try:
            if self._state is _State.AWAIT_CONNECT:
                outcome = self._connect(packet_type, flags, body)
            else:
                outcome = self._packet(packet_type, flags, body)
        except ProtocolViolation as exc:
            outcome = End("protocol_violation", exc.message)
        if not isinstance(outcome, Reply):
            self._state = _State.DONE
        return outcome

    def _connect(self, packet_type: int, flags: int, body: bytes) -> Outcome:
        if packet_type != wire.CONNECT:
            raise wire.violation(f"first packet is {wire.NAMES.get(packet_type, packet_type)}, not CONNECT")
        fields = wire.parse_connect(flags, body)
        self.client_id = fields.client_id
        if fields.protocol_level != MQTT_3_1_1:
            return End(
                "unsupported_protocol",
                f"protocol level {fields.protocol_level}; only MQTT 3.1.1 is served",
                connack(CONNACK_BAD_PROTOCOL),
            )
        if self._over_limit:
            return End(
                RATE_LIMITED,
                "too many provisioning attempts from this address",
                connack(CONNACK_SERVER_UNAVAILABLE),
            )
        self._state = _State.CONNECTED
        return Reply(connack(CONNACK_ACCEPTED))

    def _packet(self, packet_type: int, flags: int, body: bytes) -> Outcome:
        wire.check_packet(packet_type, flags, body)
        if packet_type == wire.PINGREQ:
            return Reply(wire.encode_frame(wire.PINGRESP, 0, b""))
        if packet_type == wire.DISCONNECT:
            return End(CLIENT_DISCONNECT, "the client disconnected")
        if packet_type == wire.SUBSCRIBE:
            return self._subscribe(body)
        if packet_type == wire.PUBLISH:
            return self._publish(wire.parse_publish(flags, body))
        return End("packet_forbidden", f"{wire.NAMES[packet_type]} is not served on this listener")

    def _subscribe(self, body: bytes) -> Reply:
        packet_id, filters = wire.parse_subscribe(body)
        codes = bytearray()
        for topic_filter, _ in filters:
            delivers = SUBSCRIBE_GRANTS.get(topic_filter)
            if delivers is None:
                codes.append(SUBACK_FAILURE)
            else:
                self._answers |= delivers
                codes.append(0)  # the answer is sent at QoS 0
        return Reply(wire.encode_frame(wire.SUBACK, 0, struct.pack("!H", packet_id) + bytes(codes)))

    def _publish(self, publish: wire.PublishFields) -> Outcome:
        if publish.topic != REQUEST_TOPIC:
            return End("topic_forbidden", f"publishing to {publish.topic!r} is not allowed here")
        if publish.qos == 2:
            return End("qos_unsupported", "provisioning requests use QoS 0 or 1")
        if self._answers != ANSWER_TOPICS:
            return End(
                "not_subscribed",
                f"subscribe to {ACCEPTED_TOPIC} and {REJECTED_TOPIC} before sending a request",
            )
        ack = (
            b""
            if publish.packet_id is None
            else wire.encode_frame(wire.PUBACK, 0, struct.pack("!H", publish.packet_id))
        )
        try:
            request = ProvisionRequest.from_payload(publish.payload)
        except InvalidValue as exc:
            return End(exc.code, exc.message, ack + rejected_answer(exc.code, exc.message))
        return Redeem(request, ack)
