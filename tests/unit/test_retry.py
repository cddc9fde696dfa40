"""Backoff maths and exception filtering of RetryPolicy (pure logic)."""

from __future__ import annotations

import pytest

from core import RetryPolicy
from core.errors import ConfigurationError


def test_default_delays_are_2_4_8_16_32_without_jitter() -> None:
    policy = RetryPolicy(jitter=0)
    assert [policy.delay_for(n) for n in range(1, 6)] == [2, 4, 8, 16, 32]


def test_default_delays_stay_within_jitter_band() -> None:
    policy = RetryPolicy()
    for n, expected in zip(range(1, 6), [2, 4, 8, 16, 32], strict=False):
        samples = [policy.delay_for(n) for _ in range(500)]
        assert all(expected * 0.9 - 1e-9 <= s <= expected * 1.1 + 1e-9 for s in samples)
        # jitter really spreads the delays (thundering herds avoided)
        assert max(samples) - min(samples) > expected * 0.1


def test_delay_is_capped_by_max_delay_even_with_jitter() -> None:
    policy = RetryPolicy(base_delay=1, multiplier=10, max_delay=50, jitter=0.5)
    assert policy.base_delay_for(3) == 50
    assert all(policy.delay_for(n) <= 50 for n in range(1, 40) for _ in range(20))
    assert RetryPolicy(max_delay=300).base_delay_for(10_000) == 300  # no overflow


def test_retry_on_and_no_retry_on_filter_both_ways() -> None:
    class Transient(Exception):
        pass

    class Fatal(Transient):
        pass

    policy = RetryPolicy(retry_on=(Transient,), no_retry_on=(Fatal,))
    assert policy.should_retry(Transient("x"))
    assert not policy.should_retry(Fatal("x"))  # excluded although a Transient
    assert not policy.should_retry(ValueError("x"))  # not in retry_on
    assert RetryPolicy().should_retry(ValueError("x"))
    assert not RetryPolicy(no_retry_on=(ValueError,)).should_retry(ValueError("x"))


@pytest.mark.parametrize(
    "kwargs", [{"base_delay": -1}, {"multiplier": 0.5}, {"jitter": 1.5}, {"jitter": -0.1}]
)
def test_invalid_policy_is_a_configuration_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)
