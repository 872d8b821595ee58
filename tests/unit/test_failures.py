"""The connect-failure aggregator: grouping, bounds, what is kept of a certificate, and restore."""

from __future__ import annotations

import ssl
from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.admission import Refusal
from gateway.core.clock import utcnow
from gateway.core.failures import (
    MAX_CERTIFICATE_BYTES,
    MAX_CLIENT_ID,
    Attempt,
    FailureAggregator,
    FailureRecord,
    failure_key,
)

T0 = utcnow()
FP = "ab" * 32
DER = b"0\x82\x01\x00" + b"\x00" * 256  # stands in for a certificate (only converted to PEM)


def attempt(i: int = 0, **fields: object) -> Attempt:
    values: dict[str, object] = {
        "reason": Refusal.DEVICE_BLOCKED,
        "at": T0 + timedelta(seconds=i),
        "client_ip": "10.0.0.1",
        "client_id": f"client-{i}",
        "fingerprint": FP,
    }
    values.update(fields)
    return Attempt(**values)  # type: ignore[arg-type]


def test_refusals_of_one_key_become_one_tally_with_count_first_and_last() -> None:
    """Many refusals of one certificate and reason: one tally, the count, the first and the latest."""
    aggregator = FailureAggregator(max_keys=10)
    for i in range(500):
        assert aggregator.add(attempt(i, client_ip=f"10.0.0.{i % 7}"))
    [tally] = aggregator.drain()
    assert (tally.key, tally.reason, tally.count) == (FP, "device_blocked", 500)
    assert (tally.first_seen_at, tally.last_seen_at) == (T0, T0 + timedelta(seconds=499))
    assert (tally.last_client_id, tally.last_client_ip) == ("client-499", f"10.0.0.{499 % 7}")
    assert aggregator.pending == 0 and aggregator.drain() == []


def test_keys_are_the_fingerprint_and_reason_or_the_address_without_a_certificate() -> None:
    """Another reason is another key; without a certificate the address is the key."""
    aggregator = FailureAggregator(max_keys=10)
    aggregator.add(attempt(0))
    aggregator.add(attempt(1, reason=Refusal.DEVICE_INACTIVE))
    aggregator.add(attempt(2, reason=Refusal.NO_CERTIFICATE, fingerprint=None))
    keys = {(t.key, t.reason) for t in aggregator.drain()}
    assert keys == {(FP, "device_blocked"), (FP, "device_inactive"), ("ip:10.0.0.1", "no_certificate")}
    assert failure_key(None, "::1") == "ip:::1"


def test_at_most_max_keys_wait_and_further_keys_are_only_counted() -> None:
    """Beyond max_keys a new key is dropped (and counted); known keys still count up."""
    aggregator = FailureAggregator(max_keys=3)
    for i in range(10):
        aggregator.add(attempt(i, fingerprint=f"{i:064x}"))
    assert aggregator.add(attempt(20, fingerprint=f"{0:064x}"))  # a waiting key still counts
    assert (aggregator.pending, aggregator.dropped) == (3, 7)
    assert sorted(t.count for t in aggregator.drain()) == [1, 1, 2]


def test_only_an_unknown_certificate_is_kept_and_only_up_to_the_limit() -> None:
    """The certificate is kept (as PEM) for unknown certificates only, and not when too large."""
    aggregator = FailureAggregator(max_keys=10)
    aggregator.add(attempt(0, reason=Refusal.UNKNOWN_CERTIFICATE, certificate_der=DER))
    aggregator.add(attempt(1, reason=Refusal.DEVICE_BLOCKED, certificate_der=DER))
    big = b"\x00" * (MAX_CERTIFICATE_BYTES + 1)
    aggregator.add(attempt(2, reason=Refusal.UNKNOWN_CERTIFICATE, fingerprint="cd" * 32, certificate_der=big))
    kept = {t.key + "/" + t.reason: t.certificate_pem for t in aggregator.drain()}
    assert kept[f"{FP}/unknown_certificate"] == ssl.DER_cert_to_PEM_cert(DER)
    assert kept[f"{FP}/device_blocked"] is None
    assert kept[f"{'cd' * 32}/unknown_certificate"] is None


def test_long_client_ids_are_cut() -> None:
    """A client id is kept up to MAX_CLIENT_ID characters (MQTT allows 65,535 bytes)."""
    aggregator = FailureAggregator(max_keys=1)
    aggregator.add(attempt(0, client_id="x" * 70_000))
    assert len(aggregator.drain()[0].last_client_id) == MAX_CLIENT_ID


def test_restore_puts_a_failed_flush_back_merged_with_what_came_since() -> None:
    """What a failed flush drained is counted again at the next one, together with newer refusals."""
    aggregator = FailureAggregator(max_keys=10)
    aggregator.add(attempt(0, reason=Refusal.UNKNOWN_CERTIFICATE, certificate_der=DER))
    drained = aggregator.drain()
    aggregator.add(attempt(5, reason=Refusal.UNKNOWN_CERTIFICATE))
    aggregator.restore(drained)
    [tally] = aggregator.drain()
    assert (tally.count, tally.first_seen_at, tally.last_seen_at) == (2, T0, T0 + timedelta(seconds=5))
    assert tally.certificate_pem == ssl.DER_cert_to_PEM_cert(DER)


def test_only_an_unapproved_unknown_certificate_that_was_kept_is_approvable() -> None:
    """approvable: reason unknown_certificate, certificate kept, not approved yet."""
    base = FailureRecord(FP, "unknown_certificate", FP, 1, T0, T0, "c", "10.0.0.1", None, "PEM")
    assert base.approvable
    assert not FailureRecord(FP, "device_blocked", FP, 1, T0, T0, "c", "10.0.0.1", "d", "PEM").approvable
    assert not FailureRecord(FP, "unknown_certificate", FP, 1, T0, T0, "c", "10.0.0.1", None, None).approvable
    approved = FailureRecord(FP, "unknown_certificate", FP, 1, T0, T0, "c", "1", None, "PEM", "dev-1", T0)
    assert not approved.approvable


@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(list(Refusal)), st.integers(0, 10_000)), max_size=200
    ),
    st.integers(1, 8),
)
def test_the_aggregate_never_exceeds_its_bound_and_loses_no_count(
    attempts: list[tuple[int, Refusal, int]], max_keys: int
) -> None:
    """Whatever arrives: at most max_keys keys, and recorded plus dropped is every attempt."""
    aggregator = FailureAggregator(max_keys=max_keys)
    for key, reason, second in attempts:
        aggregator.add(attempt(second, fingerprint=f"{key:064x}", reason=reason))
        assert aggregator.pending <= max_keys
    tallies = aggregator.drain()
    assert sum(t.count for t in tallies) + aggregator.dropped == len(attempts)
    assert all(t.first_seen_at <= t.last_seen_at for t in tallies)
