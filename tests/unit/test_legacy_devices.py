"""The 8250 UART, the i8042 reset line and the PIO bus, driven as a guest driver would."""

from __future__ import annotations

import pytest

from ember.devices.bus import Bus, BusConflict
from ember.devices.legacy import serial as uart
from ember.devices.legacy.i8042 import I8042, I8042_PORT_BASE, I8042_PORT_LEN
from ember.vmm.console import ConsoleSink


class Line:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.levels.append(level)

    @property
    def high(self) -> bool:
        return bool(self.levels) and self.levels[-1]


@pytest.fixture
def dev() -> tuple[uart.Serial8250, list[bytes], Line]:
    out: list[bytes] = []
    line = Line()
    return uart.Serial8250(out.append, line), out, line


def reg(dev: uart.Serial8250, offset: int) -> int:
    return dev.read(offset, 1)[0]


def test_transmit_goes_to_the_sink(dev: tuple[uart.Serial8250, list[bytes], Line]) -> None:
    s, out, _ = dev
    for ch in b"hi\n":
        assert reg(s, uart.UART_LSR) & uart.UART_LSR_THRE
        s.write(uart.UART_TX, bytes([ch]))
    assert b"".join(out) == b"hi\n"


def test_thre_interrupt_raised_on_enable_and_cleared_by_iir_read(
    dev: tuple[uart.Serial8250, list[bytes], Line],
) -> None:
    s, _, line = dev
    s.write(uart.UART_IER, bytes([uart.UART_IER_THRI]))
    assert line.high
    assert reg(s, uart.UART_IIR) & 0x0F == uart.UART_IIR_THRI
    assert not line.high
    assert reg(s, uart.UART_IIR) & 0x0F == uart.UART_IIR_NO_INT
    s.write(uart.UART_TX, b"x")  # the transmitter empties again at once
    assert line.high


def test_no_interrupt_without_out2(dev: tuple[uart.Serial8250, list[bytes], Line]) -> None:
    s, _, line = dev
    s.write(uart.UART_MCR, bytes([0]))
    s.write(uart.UART_IER, bytes([uart.UART_IER_THRI]))
    assert not line.high


def test_receive_data_and_interrupt(dev: tuple[uart.Serial8250, list[bytes], Line]) -> None:
    s, _, line = dev
    s.write(uart.UART_IER, bytes([uart.UART_IER_RDI]))
    s.enqueue_input(b"ok")
    assert line.high and reg(s, uart.UART_LSR) & uart.UART_LSR_DR
    assert reg(s, uart.UART_IIR) & 0x0F == uart.UART_IIR_RDI
    assert reg(s, uart.UART_RX) == ord("o") and reg(s, uart.UART_RX) == ord("k")
    assert not line.high and not reg(s, uart.UART_LSR) & uart.UART_LSR_DR


def test_input_is_bounded(dev: tuple[uart.Serial8250, list[bytes], Line]) -> None:
    s, _, _ = dev
    s.enqueue_input(bytes(uart.RX_FIFO_LIMIT + 10))
    assert s.dropped_input == 10


def test_divisor_latch_scratch_and_loopback_as_the_probe_expects(
    dev: tuple[uart.Serial8250, list[bytes], Line],
) -> None:
    s, out, _ = dev
    s.write(uart.UART_LCR, bytes([uart.UART_LCR_DLAB]))
    s.write(uart.UART_DLL, b"\x01")
    s.write(uart.UART_DLM, b"\x02")
    assert (reg(s, uart.UART_DLL), reg(s, uart.UART_DLM)) == (1, 2)
    s.write(uart.UART_LCR, b"\x03")
    s.write(uart.UART_SCR, b"\x5a")
    assert reg(s, uart.UART_SCR) == 0x5A
    s.write(uart.UART_MCR, bytes([uart.UART_MCR_LOOP | 0x0A]))  # RTS | OUT2
    assert reg(s, uart.UART_MSR) & 0xF0 == 0x90  # CTS | DCD
    s.write(uart.UART_TX, b"L")
    assert out == [] and reg(s, uart.UART_RX) == ord("L")
    s.write(uart.UART_FCR, bytes([uart.UART_FCR_ENABLE_FIFO]))
    assert reg(s, uart.UART_IIR) & 0xC0 == 0xC0  # 16550A


def test_i8042_reset_line() -> None:
    resets: list[int] = []
    kbd = I8042(lambda: resets.append(1))
    bus = Bus("pio")
    bus.insert(kbd, I8042_PORT_BASE, I8042_PORT_LEN)
    assert bus.read(0x64, 1) == b"\x00"  # input buffer empty: the kernel may write
    bus.write(0x64, b"\xd1")
    assert resets == []
    bus.write(0x64, b"\xfe")
    assert resets == [1]


def test_bus_routes_by_range_and_answers_nobody_with_ones() -> None:
    seen: list[tuple[str, int, bytes]] = []

    class Dev:
        def __init__(self, name: str) -> None:
            self.name = name

        def read(self, offset: int, size: int) -> bytes:
            return bytes([offset]) * size

        def write(self, offset: int, data: bytes) -> None:
            seen.append((self.name, offset, data))

    bus = Bus("pio")
    bus.insert(Dev("a"), 0x3F8, 8)
    bus.insert(Dev("b"), 0x400, 4)
    bus.write(0x3FA, b"\x01")
    bus.write(0x403, b"\x02")
    bus.write(0x404, b"\x03")
    assert seen == [("a", 2, b"\x01"), ("b", 3, b"\x02")]
    assert bus.read(0x3FF, 2) == b"\x07\x07"
    assert bus.read(0x3F7, 1) == b"\xff" and bus.unhandled_reads == 1
    assert bus.unhandled_writes == 1
    with pytest.raises(BusConflict):
        bus.insert(Dev("c"), 0x3FC, 8)


def test_console_sink_tail_and_panic_detection() -> None:
    lines: list[bytes] = []
    sink = ConsoleSink(None)
    sink.watchers.append(lines.append)
    for ch in b"booting\r\nKernel panic - not syncing: VFS: Unable to mount root fs\n":
        sink(bytes([ch]))
    assert lines[0] == b"booting"
    assert sink.panic_line == b"Kernel panic - not syncing: VFS: Unable to mount root fs"
    assert sink.tail(1).startswith("Kernel panic")


def test_console_hides_the_exit_status_line_but_records_it() -> None:
    import io

    out = io.BytesIO()
    sink = ConsoleSink(out)  # type: ignore[arg-type]
    text = b"42\nreboot: Restarting system with command 'ember-exit=7'\nrebooting\n"
    for ch in text:
        sink(bytes([ch]))
    sink.flush()
    assert out.getvalue() == b"42\nrebooting\n"
    assert sink.exit_status == 7


def test_console_hides_the_exit_line_with_a_printk_timestamp_too() -> None:
    import io

    out = io.BytesIO()
    sink = ConsoleSink(out)  # type: ignore[arg-type]
    text = (
        b"[    1.5] booting\n"
        b"[   13.585712] reboot: Restarting system with command 'ember-exit=0'\n"
        b"[   13.598501] reboot: machine restart\n"
    )
    for ch in text:
        sink(bytes([ch]))
    sink.flush()
    assert out.getvalue() == b"[    1.5] booting\n[   13.598501] reboot: machine restart\n"
    assert sink.exit_status == 0
