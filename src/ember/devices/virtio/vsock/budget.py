"""One byte budget for everything the guest may make the vsock device hold (per VMM).

The only VMM-side buffers of vsock are the connections' ``tx_buf``: bytes the
guest sent that its host socket would not take yet (host -> guest data goes
from the host socket straight into the guest's rx buffers).  How much a
connection may be made to hold is exactly the credit window we advertise
(``buf_alloc``, §5.10.6.3): the guest may have sent ``fwd_cnt + buf_alloc``
bytes, at most, and a guest that sends more is reset.  So the windows are
what this budget hands out, and the sum of the windows bounds the sum of the
buffers (``held <= total``, always).  A fixed 256 KiB window for each of 1,024
connections would be 256 MiB, four times the whole VMM's allowance.

Fairness: every connection slot keeps a floor of :data:`MIN_WINDOW` bytes set
aside (``max_connections * MIN_WINDOW`` of the total), so no connection can be
starved of credit by the others; above the floor a window grows towards its
cap from what is left, whenever we stamp a header for it, and a closed
connection gives all of it back.  Backpressure is credit: with the budget
spent, a window simply stops growing and the guest waits with the data still
in its own memory; nothing is ever dropped.

A window is never shrunk below what was already promised: the right edge
``fwd_cnt + buf_alloc`` that the guest saw must not move back (Linux up to at
least 6.1 computes its credit in u32 in ``virtio_transport_get_credit`` and
would read a shrunken window as an enormous one).
"""

from __future__ import annotations

from ember.errors import ConfigError

MIN_WINDOW = 4 * 1024  # the credit every connection is always granted (one page)
TX_BUDGET = 16 * 1024 * 1024  # bytes of guest -> host data one device may hold, in total


class TxBudget:
    """Credit windows of one device's connections, bounded in total.

    ``held`` counts the windows of open connections plus promises reserved
    for connections carried over a snapshot; ``holders`` the open connections.
    The muxer keeps ``holders <= slots`` (its connection cap), which keeps the
    floors of the free slots available.
    """

    def __init__(self, slots: int, total: int = TX_BUDGET, floor: int = MIN_WINDOW) -> None:
        if total < slots * floor:
            raise ConfigError(
                f"a vsock buffer budget of {total} bytes cannot give {slots} connections "
                f"{floor} bytes each: raise the budget or lower max_connections"
            )
        self.slots = slots
        self.total = total
        self.floor = floor
        self.held = 0
        self.holders = 0

    def available(self) -> int:
        """Bytes a window may still grow by, the free slots' floors kept aside."""
        return max(0, self.total - self.held - self.floor * max(0, self.slots - self.holders))

    def open(self, promised: int = 0) -> int:
        """A new connection's window: its floor, or a promise already reserved by :meth:`hold`."""
        window = max(promised, self.floor)
        self.held += window - promised
        self.holders += 1
        return window

    def resize(self, window: int, want: int) -> int:
        """The window a connection holding ``window`` gets when it asks for ``want``.

        Shrinking always succeeds (the caller keeps its promises); growing
        takes what is available, maybe nothing.
        """
        new = want if want <= window else window + min(want - window, self.available())
        self.held += new - window
        return new

    def close(self, window: int) -> None:
        """A connection closed: its window (floor included) comes back."""
        self.held -= window
        self.holders -= 1

    def hold(self, promised: int) -> bool:
        """Reserve a promise made before a snapshot (a resumable connection), if it fits."""
        if promised > self.available():
            return False
        self.held += promised
        return True

    def release(self, promised: int) -> None:
        """Give back a promise reserved with :meth:`hold` that no connection took over."""
        self.held -= promised
