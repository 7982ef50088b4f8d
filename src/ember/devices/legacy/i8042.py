"""The i8042 keyboard controller, reduced to what a microVM needs: the reset line.

Linux's ``reboot=k`` waits for the controller's input buffer to drain
(status port 0x64, bit 1 clear) and then writes command 0xFE, "pulse the
reset line".  We answer every status read with an idle controller and turn
0xFE into a reset request.
"""

from __future__ import annotations

from collections.abc import Callable

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_PORT_BASE = 0x60
I8042_PORT_LEN = 5  # 0x60..0x64
I8042_CMD_RESET_CPU = 0xFE
I8042_STATUS_IDLE = 0x00


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> bytes:
        return bytes([I8042_STATUS_IDLE]) * size

    def write(self, offset: int, data: bytes) -> None:
        if offset == I8042_COMMAND_PORT - I8042_PORT_BASE and data[:1] == bytes(
            [I8042_CMD_RESET_CPU]
        ):
            self._on_reset()
