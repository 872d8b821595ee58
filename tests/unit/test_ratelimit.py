"""The per-address rate limit: token buckets over an injected clock, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.ratelimit import Rate, RateLimiter
from gateway.errors import InvalidValue

TEN_A_MINUTE = Rate(10, per_s=60.0)


def spend(limiter: RateLimiter, key: str, now: float, times: int) -> list[bool]:
    return [limiter.allow(key, now).allowed for _ in range(times)]


def test_a_burst_up_to_the_rate_is_allowed_then_refused_with_a_retry_time() -> None:
    """Ten attempts at once pass; the eleventh is refused and told to wait one refill (6 s)."""
    limiter = RateLimiter(TEN_A_MINUTE)
    assert spend(limiter, "10.0.0.1", 0.0, 10) == [True] * 10
    verdict = limiter.allow("10.0.0.1", 0.0)
    assert not verdict.allowed
    assert verdict.retry_after_s == pytest.approx(6.0)


def test_one_attempt_is_regained_every_period_divided_by_the_rate() -> None:
    """After a spent burst, one attempt comes back every 6 s, not earlier."""
    limiter = RateLimiter(TEN_A_MINUTE)
    spend(limiter, "a", 0.0, 10)
    assert not limiter.allow("a", 5.9).allowed
    assert limiter.allow("a", 6.0).allowed
    assert not limiter.allow("a", 6.0).allowed
    assert limiter.allow("a", 12.0).allowed


def test_refused_attempts_do_not_push_the_next_allowed_one_further_away() -> None:
    """Hammering while refused costs nothing extra: the refill keeps its pace."""
    limiter = RateLimiter(Rate(1, per_s=10.0))
    assert limiter.allow("a", 0.0).allowed
    for moment in (1.0, 2.0, 5.0, 9.0):
        verdict = limiter.allow("a", moment)
        assert not verdict.allowed
        assert verdict.retry_after_s == pytest.approx(10.0 - moment)
    assert limiter.allow("a", 10.0).allowed


def test_each_address_has_its_own_bucket() -> None:
    """One address spending its attempts leaves another's untouched."""
    limiter = RateLimiter(Rate(2))
    assert spend(limiter, "a", 0.0, 3) == [True, True, False]
    assert spend(limiter, "b", 0.0, 2) == [True, True]


def test_an_address_idle_for_a_period_is_forgotten() -> None:
    """A bucket that has refilled is dropped, and the address starts full again."""
    limiter = RateLimiter(Rate(2, per_s=60.0))
    spend(limiter, "a", 0.0, 2)
    limiter.allow("b", 30.0)
    assert len(limiter) == 2
    limiter.allow("c", 60.0)
    assert len(limiter) == 2  # "a" was idle for 60 s
    assert spend(limiter, "a", 60.0, 3) == [True, True, False]


def test_the_table_is_capped_by_evicting_the_least_recently_seen_address() -> None:
    """A new address at a full table evicts the oldest one, which then starts afresh."""
    limiter = RateLimiter(Rate(1), max_keys=3)
    for index, key in enumerate("abc"):
        assert limiter.allow(key, float(index)).allowed
    assert not limiter.allow("a", 3.0).allowed  # "a" is now the most recently seen
    assert limiter.allow("d", 4.0).allowed  # evicts "b"
    assert len(limiter) == 3
    assert limiter.allow("b", 5.0).allowed  # forgotten, so full again
    assert not limiter.allow("d", 5.0).allowed


@pytest.mark.parametrize(("attempts", "per_s"), [(0, 60.0), (-1, 60.0), (1, 0.0), (1, -5.0)])
def test_a_rate_is_validated_at_construction(attempts: int, per_s: float) -> None:
    """A rate without attempts or without a positive period cannot be built."""
    with pytest.raises(InvalidValue):
        Rate(attempts, per_s=per_s)


@given(
    attempts=st.integers(min_value=1, max_value=20),
    steps=st.lists(
        st.tuples(st.sampled_from("abcd"), st.floats(min_value=0.0, max_value=20.0)), max_size=300
    ),
)
def test_no_address_ever_gets_more_than_its_rate(attempts: int, steps: list[tuple[str, float]]) -> None:
    """Between any two allowed attempts of an address, at most `attempts + elapsed / refill` passed."""
    limiter = RateLimiter(Rate(attempts, per_s=60.0))
    refill = 60.0 / attempts
    now = 0.0
    allowed: dict[str, list[float]] = {}
    for key, gap in steps:
        now += gap
        if limiter.allow(key, now).allowed:
            allowed.setdefault(key, []).append(now)
    for moments in allowed.values():
        for first in range(len(moments)):
            for last in range(first, len(moments)):
                count = last - first + 1
                assert count <= attempts + (moments[last] - moments[first]) / refill + 1e-9


@given(
    max_keys=st.integers(min_value=1, max_value=16),
    steps=st.lists(st.tuples(st.integers(0, 1000), st.floats(0.0, 5.0)), max_size=300),
)
def test_the_table_never_holds_more_than_max_keys(max_keys: int, steps: list[tuple[int, float]]) -> None:
    """However many addresses arrive, at any pace, the limiter remembers at most `max_keys`."""
    limiter = RateLimiter(Rate(3), max_keys=max_keys)
    now = 0.0
    for key, gap in steps:
        now += gap
        limiter.allow(str(key), now)
        assert len(limiter) <= max_keys
