"""EventLoop.call_every: periodic callbacks on the event thread (the guest profiler's clock)."""

from __future__ import annotations

import threading
import time

from ember.vmm.event_loop import EventLoop


def test_a_periodic_callback_runs_until_cancelled_and_others_keep_theirs() -> None:
    loop = EventLoop()
    calls: list[str] = []
    done = threading.Event()
    handles: dict[str, int] = {}

    def fast() -> None:
        calls.append("fast")
        if calls.count("fast") == 3:
            loop.cancel(handles["fast"])  # from its own callback: the event thread

    def slow() -> None:
        calls.append("slow")
        if calls.count("slow") == 2:
            done.set()

    handles["fast"] = loop.call_every(0.01, fast)
    handles["slow"] = loop.call_every(0.2, slow)
    loop.start()
    try:
        assert done.wait(10)
        time.sleep(0.05)
    finally:
        loop.close()
    assert calls.count("fast") == 3  # cancelled: never called again
    assert calls.index("slow") > calls.index("fast")


def test_a_failing_periodic_callback_is_counted_not_fatal() -> None:
    loop = EventLoop()
    seen = threading.Event()
    count = 0

    def broken() -> None:
        nonlocal count
        count += 1
        if count >= 2:
            seen.set()
        raise RuntimeError("device bug")

    loop.call_every(0.01, broken)
    loop.start()
    try:
        assert seen.wait(10)
    finally:
        loop.close()
    assert loop.callback_errors >= 2
