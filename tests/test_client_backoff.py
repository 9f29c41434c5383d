"""felix.client.Backoff: exponential growth, a cap, full jitter, driven by a fake random source."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest

from felix.client import Backoff


def fixed(*values: float) -> Callable[[], float]:
    it: Iterator[float] = iter(values)
    return lambda: next(it)


def test_ceiling_doubles_up_to_the_cap() -> None:
    backoff = Backoff(base=0.1, cap=1.0, random=lambda: 0.999999)
    ceilings = []
    for _ in range(8):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])
    assert backoff.attempts == 8


def test_delay_is_the_random_fraction_of_the_ceiling() -> None:
    # Full jitter: the whole interval [0, ceiling) is randomised, on every attempt.
    backoff = Backoff(base=0.5, cap=10.0, random=fixed(0.0, 0.5, 0.25, 0.999))
    assert backoff.next_delay() == 0.0
    assert backoff.next_delay() == pytest.approx(0.5 * 1.0)
    assert backoff.next_delay() == pytest.approx(0.25 * 2.0)
    assert backoff.next_delay() == pytest.approx(0.999 * 4.0)


def test_reset_starts_over() -> None:
    backoff = Backoff(base=0.1, cap=5.0, random=lambda: 0.5)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() == pytest.approx(0.05)


def test_many_attempts_stay_at_the_cap_without_overflow() -> None:
    backoff = Backoff(base=0.1, cap=30.0, random=lambda: 0.5)
    for _ in range(5000):
        delay = backoff.next_delay()
    assert delay == pytest.approx(15.0)


def test_delays_spread_over_the_whole_interval() -> None:
    """With a real (seeded) source, delays cover [0, ceiling): clients do not retry in waves."""
    rng = random.Random(1234)
    delays = []
    for _ in range(2000):
        backoff = Backoff(base=1.0, cap=8.0, random=rng.random)
        for _ in range(3):
            backoff.next_delay()
        delays.append(backoff.next_delay())  # 4th attempt: ceiling 8
    assert 0 <= min(delays) < 0.1
    assert 7.9 < max(delays) < 8.0
    assert 3.7 < sum(delays) / len(delays) < 4.3  # mean of U(0, 8)


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_bad_parameters(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base=base, cap=cap)
