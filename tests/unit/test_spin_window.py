"""How long the run_code worker polls after a call (``codering.SpinWindow``): pure logic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.agent.codering import SPIN_MAX_S, SPIN_MIN_S, SpinWindow


def paced(*gaps: float) -> SpinWindow:
    """A window after calls that came ``gaps`` seconds after the previous reply."""
    spin, now = SpinWindow(), 100.0
    for gap in gaps:
        spin.replied(now)
        now += gap
        spin.arrived(now)
    return spin


def test_a_fresh_worker_polls_the_least() -> None:
    assert SpinWindow().seconds == SPIN_MIN_S


def test_a_caller_at_a_steady_pace_is_caught_by_the_next_poll() -> None:
    gap = SPIN_MAX_S * 0.6  # over the floor, under the ceiling
    assert gap > SPIN_MIN_S
    assert paced(gap).seconds == pytest.approx(min(SPIN_MAX_S, 2 * gap))
    assert paced(gap).seconds > gap


def test_a_caller_that_pauses_finds_it_asleep_and_it_polls_the_least_again() -> None:
    assert paced(SPIN_MAX_S * 0.6, SPIN_MAX_S * 3).seconds == SPIN_MIN_S


def test_the_window_never_passes_the_ceiling() -> None:
    assert paced(SPIN_MAX_S * 0.9).seconds == SPIN_MAX_S


def test_one_quick_call_halves_the_window_at_most() -> None:
    slow = paced(SPIN_MAX_S * 0.9)
    quick = paced(SPIN_MAX_S * 0.9, 0.0001)
    assert quick.seconds == pytest.approx(max(SPIN_MIN_S, slow.seconds / 2))


def test_a_clock_moved_back_by_a_restore_teaches_nothing() -> None:
    before = paced(SPIN_MAX_S * 0.6)
    spin = paced(SPIN_MAX_S * 0.6, -5.0)
    assert spin.seconds == before.seconds


def test_a_request_without_a_reply_before_it_teaches_nothing() -> None:
    spin = paced(SPIN_MAX_S * 0.6)
    learnt = spin.seconds
    spin.arrived(1e9)  # no reply since the last request: the gap is unknown
    assert spin.seconds == learnt


def test_a_new_region_forgets_the_pace() -> None:
    spin = paced(SPIN_MAX_S * 0.6)
    spin.replied(200.0)
    spin.forget()
    spin.arrived(200.001)
    assert spin.seconds == SPIN_MIN_S


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), max_size=40))
def test_any_sequence_of_gaps_keeps_the_window_in_bounds(gaps: list[float]) -> None:
    assert SPIN_MIN_S <= paced(*gaps).seconds <= SPIN_MAX_S
