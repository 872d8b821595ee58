"""Topic grammar and the ACL: the one place that decides who may publish, subscribe, receive."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import topics
from gateway.core.ids import DeviceId, OperatorName
from gateway.core.topics import Action, DevicePrincipal, OperatorPrincipal, Topic, TopicFilter
from gateway.errors import InvalidValue

DEV = DevicePrincipal(DeviceId("dev-1"))
OTHER = DevicePrincipal(DeviceId("dev-2"))
OPS = OperatorPrincipal(OperatorName("alice"))


@pytest.mark.parametrize("raw", ["a/+", "a/#", "#", "", "a\x00b", "a\x07b", "a\ud800"])
def test_bad_topic_names_are_refused(raw: str) -> None:
    """Wildcards, empty names, NUL, controls and surrogates never make a Topic."""
    with pytest.raises(InvalidValue):
        Topic(raw)


@pytest.mark.parametrize("raw", ["a/#/b", "a#", "a/b+", "+a", "", "x\x00"])
def test_bad_filters_are_refused(raw: str) -> None:
    """'#' must be the whole last level and '+' a whole level."""
    with pytest.raises(InvalidValue):
        TopicFilter(raw)


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/+/c", "a//c", True),
    ],
)
def test_matching_follows_mqtt(flt: str, topic: str, expected: bool) -> None:
    """Matching follows MQTT 3.1.1 section 4.7, including the '$' rule."""
    assert TopicFilter(flt).matches(Topic(topic)) is expected


@pytest.mark.parametrize(
    ("grant", "asked", "covered"),
    [
        ("a/#", "a/+", True),
        ("a/+", "a/#", False),  # amqtt's topic_ac("a/#", "a/+") said yes: too broad
        ("a/+", "a/b", True),
        ("a/b", "a/+", False),
        ("a/#", "a", True),
        ("a/#", "#", False),
        ("devices/+/readings", "devices/+/+", False),
        ("devices/+/readings", "devices/x/readings", True),
    ],
)
def test_covers_means_every_matched_topic_is_granted(grant: str, asked: str, covered: bool) -> None:
    """A filter is granted only when the grant matches everything the filter can match."""
    assert TopicFilter(grant).covers(TopicFilter(asked)) is covered


def test_device_publishes_only_under_its_own_prefix() -> None:
    """A device publishes under devices/{own id}/ except its gateway-owned channels."""
    assert topics.check(DEV, Action.PUBLISH, "devices/dev-1/readings")
    assert topics.check(DEV, Action.PUBLISH, "devices/dev-1/certificate/renew")
    assert not topics.check(DEV, Action.PUBLISH, "devices/dev-2/readings")
    assert not topics.check(DEV, Action.PUBLISH, "devices/dev-1/errors")
    assert not topics.check(DEV, Action.PUBLISH, "devices/dev-1/commands/reboot")
    for answer in ("accepted", "rejected", "expiring", "renew/x"):
        assert not topics.check(DEV, Action.PUBLISH, f"devices/dev-1/certificate/{answer}"), answer
    assert not topics.check(DEV, Action.PUBLISH, "devices/dev-1/certificate")
    assert not topics.check(DEV, Action.PUBLISH, "devices/dev-2/certificate/renew")
    assert not topics.check(DEV, Action.PUBLISH, "devices/dev-1")
    assert not topics.check(DEV, Action.PUBLISH, "devices/dev-1/")
    assert not topics.check(DEV, Action.PUBLISH, "gateway/status/dev-1")
    assert not topics.check(DEV, Action.PUBLISH, "$SYS/x")
    assert not topics.check(DEV, Action.PUBLISH, "devices/+/readings")


def test_device_subscribes_only_to_its_errors_commands_and_certificate() -> None:
    """A device may subscribe to its own errors, commands/# and certificate/#, or narrower."""
    for ok in (
        "devices/dev-1/errors",
        "devices/dev-1/commands/#",
        "devices/dev-1/commands/+",
        "devices/dev-1/commands/reboot",
        "devices/dev-1/certificate/#",
        "devices/dev-1/certificate/accepted",
        "devices/dev-1/certificate/+",
    ):
        assert topics.check(DEV, Action.SUBSCRIBE, ok), ok
    for bad in (
        "devices/dev-1/#",
        "devices/+/errors",
        "#",
        "devices/dev-2/errors",
        "devices/dev-2/certificate/#",
        "devices/+/certificate/accepted",
        "gateway/#",
        "devices/dev-1/readings",
        "devices/dev-1/+",
    ):
        assert not topics.check(DEV, Action.SUBSCRIBE, bad), bad


def test_operator_reads_status_events_and_device_data_only() -> None:
    """Operators read gateway/# and devices/+/{readings,health,info}; they publish nothing."""
    assert topics.check(OPS, Action.SUBSCRIBE, "gateway/#")
    assert topics.check(OPS, Action.SUBSCRIBE, "gateway/status/+")
    assert topics.check(OPS, Action.SUBSCRIBE, "devices/+/readings")
    assert topics.check(OPS, Action.RECEIVE, "devices/dev-1/health")
    assert not topics.check(OPS, Action.SUBSCRIBE, "devices/#")
    assert not topics.check(OPS, Action.SUBSCRIBE, "#")
    assert not topics.check(OPS, Action.RECEIVE, "devices/dev-1/errors")
    assert not topics.check(OPS, Action.RECEIVE, "devices/dev-1/certificate/accepted")
    assert not topics.check(OPS, Action.PUBLISH, "gateway/status/dev-1")


def test_receive_follows_the_grants() -> None:
    """A device receives only its own errors and commands."""
    assert topics.check(DEV, Action.RECEIVE, "devices/dev-1/errors")
    assert not topics.check(DEV, Action.RECEIVE, "devices/dev-2/errors")
    assert not topics.check(OTHER, Action.RECEIVE, "devices/dev-1/commands/x")


@given(st.text(max_size=80), st.sampled_from(list(Action)))
def test_check_never_raises(raw: str, action: Action) -> None:
    """Any string and action give a yes or no, never an exception."""
    assert topics.check(DEV, action, raw) in (True, False)


@given(
    st.lists(st.sampled_from(["a", "b", "+", "#", "devices", "dev-1"]), min_size=1, max_size=5),
    st.lists(st.sampled_from(["a", "b", "x", "devices", "dev-1"]), min_size=1, max_size=5),
)
def test_covers_implies_matches(grant_levels: list[str], topic_levels: list[str]) -> None:
    """If a grant covers a filter, every topic the filter matches is matched by the grant."""
    try:
        grant = TopicFilter("/".join(grant_levels))
    except InvalidValue:
        return
    topic = Topic("/".join(topic_levels))
    for asked in (TopicFilter(topic.value), grant):
        if grant.covers(asked) and asked.matches(topic):
            assert grant.matches(topic)
