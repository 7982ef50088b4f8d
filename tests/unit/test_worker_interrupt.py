"""The run_code worker's interrupt (``worker.Interrupt``): ``KeyboardInterrupt`` in a cell,
never in the worker's own code, and never in the middle of a streamed frame.

The agent sends ``SIGINT`` when a cell overruns its timeout; these tests drive the handler
directly (no signal timing to race against) and then with a real signal.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator

import pytest

from ember.agent.worker import Interrupt, Worker, _Streamer
from ember.protocol import Kind, read_frame


def test_the_handler_raises_only_while_armed_and_once() -> None:
    interrupt = Interrupt()
    interrupt.handle(signal.SIGINT, None)  # between cells: dropped
    assert not interrupt.pending
    interrupt.armed = True
    with pytest.raises(KeyboardInterrupt):
        interrupt.handle(signal.SIGINT, None)
    assert not interrupt.armed  # disarmed by raising: the cell's error handling runs in peace
    interrupt.handle(signal.SIGINT, None)


def test_a_shielded_interrupt_waits_for_the_end_of_the_section() -> None:
    interrupt = Interrupt()
    interrupt.armed = True
    interrupt.shielded = 2  # nested sections
    interrupt.handle(signal.SIGINT, None)
    assert interrupt.pending and interrupt.armed
    interrupt.unshield()  # still inside the outer section
    assert interrupt.pending
    with pytest.raises(KeyboardInterrupt):
        interrupt.unshield()
    assert (interrupt.armed, interrupt.pending, interrupt.shielded) == (False, False, 0)


def test_a_held_interrupt_is_dropped_once_the_cell_is_over() -> None:
    interrupt = Interrupt()
    interrupt.armed, interrupt.shielded = True, 1
    interrupt.handle(signal.SIGINT, None)
    interrupt.armed = False  # the cell ended while the frame was being written
    interrupt.unshield()  # nothing raised in the worker's own code


class _InterruptedMidFrame:
    """A socket whose first write is "interrupted": the signal handler runs inside it, as
    it would when SIGINT lands while ``sendall`` is blocked."""

    def __init__(self, sock: socket.socket, interrupt: Interrupt) -> None:
        self._sock = sock
        self._interrupt = interrupt
        self.fired = False

    def sendall(self, data: bytes) -> None:
        if not self.fired:
            self.fired = True
            self._interrupt.handle(signal.SIGINT, None)
        self._sock.sendall(data)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def test_a_streamed_frame_is_sent_whole_and_the_interrupt_lands_in_the_cell(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    worker = Worker()
    sock = _InterruptedMidFrame(ours, worker.interrupt)
    streamer = _Streamer(sock, worker.interrupt)  # type: ignore[arg-type]
    result = worker.run("print('first')\nprint('never')", streamer)
    assert sock.fired
    error = result["error"]
    assert error is not None and error["type"] == "KeyboardInterrupt"
    assert "<cell-" in error["traceback"]  # raised in the cell's print, after the frame
    assert result["stdout"] == "first\n"
    theirs.settimeout(5)  # a frame the interrupt cut short would never come
    assert read_frame(theirs) == (Kind.STDOUT, b"first\n")  # whole, and nothing after it
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(1)


def test_a_real_sigint_interrupts_a_cell_and_the_namespace_survives() -> None:
    worker = Worker()
    previous = signal.getsignal(signal.SIGINT)
    worker.interrupt.install()
    try:
        worker.run("kept = 3")
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        result = worker.run("import time\nwhile True:\n    time.sleep(0.01)")
        timer.join()
        assert result["error"] is not None and result["error"]["type"] == "KeyboardInterrupt"
        os.kill(os.getpid(), signal.SIGINT)  # between cells: ignored, nothing raised here
        assert worker.run("kept * 2")["value"] == "6"
    finally:
        signal.signal(signal.SIGINT, previous)
