"""A per-key rate limit (token buckets) with bounded memory; no clock of its own.

Receives a key (a source address) and the current monotonic time for each attempt;
hands on a `Verdict`: allowed, or refused with the seconds until the next attempt
would be allowed. Each key may make `Rate.attempts` at once and regains one attempt
every ``per_s / attempts`` seconds (10 per minute: a burst of 10, then one every 6 s).

Memory stays bounded without a sweeper task. A key idle for ``per_s`` has a full
bucket again, exactly like a key never seen, so it is forgotten. The table holds at
most `max_keys` keys; a new key arriving at a full table evicts the least recently
seen one, which then starts afresh with a full bucket. That fails open for the
evicted key rather than closed for every newcomer: a client that controls more
addresses than `max_keys` already has that many buckets to spend.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from gateway.errors import InvalidValue

DEFAULT_MAX_KEYS = 10_000


@dataclass(frozen=True, slots=True)
class Rate:
    """`attempts` per `per_s` seconds."""

    attempts: int
    per_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise InvalidValue("a rate needs at least one attempt", code="invalid_rate")
        if not self.per_s > 0:
            raise InvalidValue("a rate needs a positive period", code="invalid_rate")

    @property
    def refill_s(self) -> float:
        """Seconds to regain one attempt."""
        return self.per_s / self.attempts


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after_s: float = 0.0  # when refused: wait this long for the next allowed attempt


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets per key; `allow` spends one attempt when there is one."""

    def __init__(self, rate: Rate, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise InvalidValue("a rate limiter needs room for one key", code="invalid_rate")
        self.rate = rate
        self.max_keys = max_keys
        # Least recently seen first: idle keys are found (and forgotten) at the front.
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str, now: float) -> Verdict:
        """Spend one attempt for `key` at time `now` (monotonic seconds, never decreasing)."""
        self._forget_idle(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = _Bucket(float(self.rate.attempts), now)
        else:
            self._buckets.move_to_end(key)
            regained = (now - bucket.updated) / self.rate.refill_s
            bucket.tokens = min(float(self.rate.attempts), bucket.tokens + regained)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Verdict(allowed=True)
        return Verdict(allowed=False, retry_after_s=(1.0 - bucket.tokens) * self.rate.refill_s)

    def _forget_idle(self, now: float) -> None:
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < self.rate.per_s:
                return
            self._buckets.popitem(last=False)
