"""The agent's one deadline thread (ember.agent.deadlines): order, cancel, wake-ups, failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from ember.agent.deadlines import Deadlines

WAIT_S = 30.0  # how long a test waits for what must happen (never a timing assertion)


@pytest.fixture
def deadlines() -> Iterator[Deadlines]:
    made = Deadlines()
    yield made
    # the thread is a daemon; with nothing pending it sleeps without a timeout


def test_actions_run_by_their_time_not_their_order_and_cancelled_ones_never(
    deadlines: Deadlines,
) -> None:
    ran: list[str] = []
    done = threading.Event()
    deadlines.add(0.3, lambda: (ran.append("late"), done.set()))
    gone = deadlines.add(0.1, lambda: ran.append("cancelled"))
    deadlines.add(0.2, lambda: ran.append("middle"))
    deadlines.add(0.0, lambda: ran.append("now"))
    assert deadlines.cancel(gone) is True
    assert done.wait(WAIT_S)
    assert ran == ["now", "middle", "late"]
    assert deadlines.cancel(gone) is False and deadlines.pending() == 0


def test_an_earlier_deadline_wakes_a_thread_sleeping_towards_a_later_one(
    deadlines: Deadlines,
) -> None:
    early, running = threading.Event(), threading.Event()
    late = deadlines.add(3600.0, lambda: None)
    deadlines.add(0.0, running.set)
    assert running.wait(WAIT_S)
    time.sleep(0.2)  # the thread goes back to sleep, now towards the hour
    deadlines.add(0.05, early.set)
    assert early.wait(WAIT_S)  # without the wake-up this would wait the hour
    assert deadlines.cancel(late) and deadlines.pending() == 0


def test_an_action_that_raises_is_logged_and_the_next_still_runs(
    deadlines: Deadlines, capsys: pytest.CaptureFixture[str]
) -> None:
    after = threading.Event()

    def broken() -> None:
        raise RuntimeError("boom")

    deadlines.add(0.0, broken)
    deadlines.add(0.05, after.set)
    assert after.wait(WAIT_S)
    assert "boom" in capsys.readouterr().err


def test_a_cancel_during_the_wait_leaves_the_thread_serving_others(
    deadlines: Deadlines,
) -> None:
    later = threading.Event()
    ran: list[str] = []
    first = deadlines.add(0.1, lambda: ran.append("cancelled"))
    assert deadlines.cancel(first)
    deadlines.add(0.2, later.set)
    assert later.wait(WAIT_S) and deadlines.pending() == 0 and ran == []
