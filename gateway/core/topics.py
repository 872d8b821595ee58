"""MQTT topic grammar and the topic permissions of every principal: one module.

Receives raw topic strings (from the wire, already strictly UTF-8 decoded) and
principals (who the gateway verified a session to be); hands on `Topic` /
`TopicFilter` value objects and yes/no answers. Nothing else in the gateway
decides who may publish, subscribe or receive where.

Grants (DESIGN.md §7):

- a device publishes under ``devices/{own id}/...`` except its gateway-owned
  channels ``errors``, ``commands/...`` and ``certificate/...`` (where it may
  publish only ``certificate/renew``); it subscribes only to its own ``errors``,
  ``commands/#`` and ``certificate/#`` (or narrower filters inside them);
- an operator subscribes to ``gateway/#`` and ``devices/+/{readings,health,info}``
  (or narrower filters) and publishes nothing.

A subscription is granted only when *every* topic its filter can match is
covered by a grant (``a/#`` is broader than ``a/+`` and is refused against it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.core.ids import DeviceId, OperatorName
from gateway.errors import InvalidValue

MAX_TOPIC_BYTES = 65535


def _check_text(kind: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidValue(f"{kind} must be a non-empty string", code="invalid_topic")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise InvalidValue(f"{kind} longer than {MAX_TOPIC_BYTES} bytes", code="invalid_topic")
    for ch in value:
        code = ord(ch)
        # NUL is forbidden by MQTT-1.5.3-2; other controls and surrogates are refused
        # because topics end up in logs, JSON and database keys.
        if code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF:
            raise InvalidValue(f"{kind} contains control character U+{code:04X}", code="invalid_topic")


@dataclass(frozen=True, slots=True)
class Topic:
    """A concrete topic name, as published: no wildcards."""

    value: str

    def __post_init__(self) -> None:
        _check_text("topic", self.value)
        if "+" in self.value or "#" in self.value:
            raise InvalidValue(f"topic {self.value!r} contains a wildcard", code="invalid_topic")

    @property
    def levels(self) -> list[str]:
        return self.value.split("/")

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A subscription filter: ``+`` fills a whole level, ``#`` only the last one."""

    value: str

    def __post_init__(self) -> None:
        _check_text("topic filter", self.value)
        levels = self.value.split("/")
        for index, level in enumerate(levels):
            if "#" in level and (level != "#" or index != len(levels) - 1):
                raise InvalidValue(
                    f"'#' must be the whole last level in {self.value!r}", code="invalid_topic"
                )
            if "+" in level and level != "+":
                raise InvalidValue(f"'+' must fill a whole level in {self.value!r}", code="invalid_topic")

    @property
    def levels(self) -> list[str]:
        return self.value.split("/")

    def matches(self, topic: Topic) -> bool:
        """MQTT matching, including the rule that wildcards first never match ``$`` topics."""
        if topic.value.startswith("$") and self.value[0] in "+#":
            return False
        names = topic.levels
        for index, level in enumerate(self.levels):
            if level == "#":
                return True
            if index >= len(names) or level not in ("+", names[index]):
                return False
        return len(names) == len(self.levels)

    def covers(self, other: TopicFilter) -> bool:
        """True when every topic that `other` can match is also matched by this filter."""
        mine, theirs = self.levels, other.levels
        for index, level in enumerate(mine):
            if level == "#":
                return True
            if index >= len(theirs):
                return False
            their = theirs[index]
            if level == "+":
                if their == "#":
                    return False
            elif their != level:  # a literal grant level covers only the same literal
                return False
        return len(mine) == len(theirs)

    def __str__(self) -> str:
        return self.value


class Action(enum.Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


@dataclass(frozen=True, slots=True)
class DevicePrincipal:
    device_id: DeviceId


@dataclass(frozen=True, slots=True)
class OperatorPrincipal:
    name: OperatorName


Principal = DevicePrincipal | OperatorPrincipal

# Channels a device receives from the gateway and may therefore not publish to,
# except for the requests listed in DEVICE_REQUESTS.
GATEWAY_OWNED_CHANNELS = frozenset({"errors", "commands", "certificate"})
DEVICE_REQUESTS = frozenset({("certificate", "renew")})
OPERATOR_SUBSCRIBE_GRANTS = (
    TopicFilter("gateway/#"),
    TopicFilter("devices/+/readings"),
    TopicFilter("devices/+/health"),
    TopicFilter("devices/+/info"),
)


def device_subscribe_grants(device_id: DeviceId) -> tuple[TopicFilter, ...]:
    return (
        TopicFilter(f"devices/{device_id}/errors"),
        TopicFilter(f"devices/{device_id}/commands/#"),
        TopicFilter(f"devices/{device_id}/certificate/#"),
    )


def may_publish(principal: Principal, topic: Topic) -> bool:
    """May `principal` publish to `topic`?"""
    if isinstance(principal, OperatorPrincipal):
        return False
    levels = topic.levels
    if not (len(levels) >= 3 and levels[0] == "devices" and levels[1] == principal.device_id.value):
        return False
    if levels[2] in GATEWAY_OWNED_CHANNELS:
        return tuple(levels[2:]) in DEVICE_REQUESTS
    return all(levels[2:])


def subscribe_grants(principal: Principal) -> tuple[TopicFilter, ...]:
    if isinstance(principal, OperatorPrincipal):
        return OPERATOR_SUBSCRIBE_GRANTS
    return device_subscribe_grants(principal.device_id)


def may_subscribe(principal: Principal, topic_filter: TopicFilter) -> bool:
    """May `principal` subscribe with `topic_filter`? Only if a grant covers all of it."""
    return any(grant.covers(topic_filter) for grant in subscribe_grants(principal))


def may_receive(principal: Principal, topic: Topic) -> bool:
    """May a message on `topic` be delivered to `principal` (live or retained)?"""
    return any(grant.matches(topic) for grant in subscribe_grants(principal))


def check(principal: Principal, action: Action, raw: str) -> bool:
    """The broker adapter's single entry point: parse `raw` for `action` and decide; invalid is no."""
    try:
        if action is Action.SUBSCRIBE:
            return may_subscribe(principal, TopicFilter(raw))
        topic = Topic(raw)
    except InvalidValue:
        return False
    if action is Action.PUBLISH:
        return may_publish(principal, topic)
    return may_receive(principal, topic)


# Topics the gateway itself publishes on (DESIGN.md §7).
def status_topic(device_id: DeviceId | str) -> str:
    return f"gateway/status/{device_id}"


def event_topic(kind: str) -> str:
    return f"gateway/events/{kind}"


def errors_topic(device_id: DeviceId | str) -> str:
    return f"devices/{device_id}/errors"


def certificate_topic(device_id: DeviceId | str, what: str) -> str:
    """``devices/{id}/certificate/{renew|accepted|rejected|expiring}``."""
    return f"devices/{device_id}/certificate/{what}"
