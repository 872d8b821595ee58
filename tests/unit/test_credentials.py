"""The pure parts of the certificate lifecycle: the remaining share of a validity, renewal requests."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ca
from gateway.credentials import parse_renewal, remaining_share
from gateway.errors import ProvisioningRefused

START = datetime(2026, 1, 1, tzinfo=UTC)
END = START + timedelta(days=100)


@pytest.mark.parametrize(
    ("now", "share"),
    [
        (START, 1.0),
        (START + timedelta(days=20), 0.8),
        (START + timedelta(days=99), 0.01),
        (END, 0.0),
        (END + timedelta(days=1), 0.0),  # expired: nothing left, never negative
        (START - timedelta(days=1), 1.0),  # not yet valid: never more than all of it
    ],
)
def test_remaining_share_is_the_part_of_the_validity_still_ahead(now: datetime, share: float) -> None:
    """remaining_share is (not_after - now) / validity, clamped to [0, 1]."""
    assert remaining_share(START, END, now) == pytest.approx(share)


def test_remaining_share_of_an_empty_or_inverted_validity_is_zero() -> None:
    """A certificate whose validity has no length has nothing left (no division by zero)."""
    assert remaining_share(START, START, START) == 0.0
    assert remaining_share(END, START, START) == 0.0


def test_the_hint_threshold_separates_a_fresh_certificate_from_one_in_its_last_share() -> None:
    """With the CA's 5-minute backdating, a 1-hour certificate starts below 0.99 and a year-long one above."""
    now = START
    backdated = now - timedelta(minutes=5)
    assert remaining_share(backdated, now + timedelta(hours=1), now) < 0.99
    assert remaining_share(backdated, now + timedelta(days=365), now) > 0.99


def test_a_renewal_request_yields_its_csr() -> None:
    """{"csr": PEM} gives the PEM text, untouched (vetting is the CA's job)."""
    pem = ca.make_csr(ca.generate_key(), "x").decode()
    assert parse_renewal(json.dumps({"csr": pem}).encode()) == pem
    assert parse_renewal(b'{"csr": "anything"}') == "anything"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",  # not UTF-8
        b"[" * 50_000,  # nested deeper than the parser recurses
        b'"csr"',
        b'["csr"]',
        b"{}",
        b'{"csr": null}',
        b'{"csr": 1}',
        b'{"csr": "x", "token": "y"}',
        b'{"CSR": "x"}',
    ],
)
def test_anything_but_exactly_a_csr_object_is_a_bad_request(payload: bytes) -> None:
    """Wrong JSON, wrong shape or extra keys raise ProvisioningRefused(bad_request)."""
    with pytest.raises(ProvisioningRefused) as refused:
        parse_renewal(payload)
    assert refused.value.code == "bad_request"


@settings(max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=512),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
            ),
            max_leaves=20,
        ).map(lambda value: json.dumps(value).encode()),
    )
)
def test_parse_renewal_returns_a_string_or_raises_provisioning_refused(payload: bytes) -> None:
    """Property: any payload gives the CSR string or ProvisioningRefused, nothing else."""
    code = None
    try:
        assert isinstance(parse_renewal(payload), str)
    except ProvisioningRefused as exc:
        code = exc.code
    assert code in (None, "bad_request")
