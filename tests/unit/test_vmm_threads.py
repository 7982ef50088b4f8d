"""The VMM's threads carry their names into the kernel (``ember.vmm.threads``)."""

from __future__ import annotations

import threading
from pathlib import Path

from ember.vmm.threads import TASK_COMM_LEN, name_this_thread


def comm_of(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().rstrip("\n")


def on_a_thread(python_name: str, kernel_name: str | None) -> str:
    """What the kernel calls a thread named ``python_name`` after it named itself."""
    seen: list[str] = []

    def body() -> None:
        assert name_this_thread(kernel_name)
        seen.append(comm_of(threading.get_native_id()))

    thread = threading.Thread(target=body, name=python_name)
    thread.start()
    thread.join()
    return seen[0]


def test_a_thread_gives_the_kernel_its_python_name() -> None:
    assert on_a_thread("ember-vcpu3", None) == "ember-vcpu3"


def test_an_explicit_name_wins_and_a_long_one_is_cut_as_the_kernel_cuts_it() -> None:
    assert on_a_thread("ignored", "ember-events") == "ember-events"
    long = "ember-" + "x" * 40
    assert on_a_thread("t", long) == long[: TASK_COMM_LEN - 1]
