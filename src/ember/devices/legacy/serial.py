"""An 8250/16550A UART: the guest's console.

Register names are those of ``include/uapi/linux/serial_reg.h``.  Output goes
to a *sink* callable; input (optional) is queued with :meth:`Serial8250.enqueue_input`.
The interrupt line is level-tracked: the device raises it while an enabled
interrupt is pending and lowers it when the guest clears the cause, which is
exactly what an edge-triggered ISA line on the I/O APIC needs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

COM1_PORT = 0x3F8
COM1_IRQ = 4
UART_PORT_LEN = 8

UART_RX = 0  # in, DLAB=0
UART_TX = 0  # out, DLAB=0
UART_DLL = 0  # DLAB=1
UART_IER = 1
UART_DLM = 1  # DLAB=1
UART_IIR = 2  # in
UART_FCR = 2  # out
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

UART_IER_RDI = 0x01
UART_IER_THRI = 0x02
UART_IER_RLSI = 0x04
UART_IER_MSI = 0x08
UART_IIR_NO_INT = 0x01
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_FIFO_ENABLED = 0xC0
UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_LCR_DLAB = 0x80
UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
UART_LSR_DR = 0x01
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80

RX_FIFO_LIMIT = 64 * 1024  # bytes of pending console input kept; more is dropped


class Serial8250:
    """A 16550A with an always-empty transmitter (output is written synchronously)."""

    def __init__(self, sink: Callable[[bytes], None], set_irq: Callable[[bool], None]) -> None:
        self._sink = sink
        self._set_irq = set_irq
        self._irq_level = False
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = UART_MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self._thr_empty_pending = False  # THRE interrupt armed until IIR is read
        self._rx: deque[int] = deque()
        self.dropped_input = 0

    # --- snapshots
    _STATE = ("ier", "lcr", "mcr", "scr", "fcr", "dll", "dlm")

    def save_state(self) -> dict[str, int | bool]:
        state: dict[str, int | bool] = {name: getattr(self, name) for name in self._STATE}
        state["thr_empty_pending"] = self._thr_empty_pending
        state["irq_level"] = self._irq_level
        return state

    def load_state(self, state: dict[str, int | bool]) -> None:
        """Registers as saved (pending input is not kept); the IRQ line is in the irqchip."""
        for name in self._STATE:
            setattr(self, name, int(state[name]) & 0xFF)
        self._thr_empty_pending = bool(state["thr_empty_pending"])
        self._irq_level = bool(state["irq_level"])

    # --- host side
    def enqueue_input(self, data: bytes) -> None:
        room = RX_FIFO_LIMIT - len(self._rx)
        self._rx.extend(data[:room])
        self.dropped_input += max(0, len(data) - room)
        self._update_irq()

    # --- interrupt logic
    def _pending(self) -> int:
        """The IIR interrupt identification (without the FIFO bits)."""
        if self.ier & UART_IER_RDI and self._rx:
            return UART_IIR_RDI
        if self.ier & UART_IER_THRI and self._thr_empty_pending:
            return UART_IIR_THRI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._pending() != UART_IIR_NO_INT and bool(self.mcr & UART_MCR_OUT2)
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)

    def _lsr(self) -> int:
        lsr = UART_LSR_THRE | UART_LSR_TEMT
        if self._rx:
            lsr |= UART_LSR_DR
        return lsr

    def _msr(self) -> int:
        if self.mcr & UART_MCR_LOOP:
            # Loopback: modem outputs feed back to the status inputs (the driver tests this).
            msr = 0
            if self.mcr & UART_MCR_RTS:
                msr |= UART_MSR_CTS
            if self.mcr & UART_MCR_DTR:
                msr |= UART_MSR_DSR
            if self.mcr & UART_MCR_OUT1:
                msr |= UART_MSR_RI
            if self.mcr & UART_MCR_OUT2:
                msr |= UART_MSR_DCD
            return msr
        return UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS

    # --- bus interface
    def read(self, offset: int, size: int) -> bytes:
        return bytes([self._read_reg(offset)]) + b"\0" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self._write_reg(offset, data[0])

    def _read_reg(self, offset: int) -> int:
        dlab = self.lcr & UART_LCR_DLAB
        value = 0
        if offset == UART_RX:
            if dlab:
                value = self.dll
            elif self._rx:
                value = self._rx.popleft()
        elif offset == UART_IER:
            value = self.dlm if dlab else self.ier
        elif offset == UART_IIR:
            value = self._pending()
            if value == UART_IIR_THRI:
                self._thr_empty_pending = False  # reading IIR clears a THRE interrupt
            if self.fcr & UART_FCR_ENABLE_FIFO:
                value |= UART_IIR_FIFO_ENABLED
        elif offset == UART_LCR:
            value = self.lcr
        elif offset == UART_MCR:
            value = self.mcr
        elif offset == UART_LSR:
            value = self._lsr()
        elif offset == UART_MSR:
            value = self._msr()
        elif offset == UART_SCR:
            value = self.scr
        self._update_irq()
        return value

    def _write_reg(self, offset: int, value: int) -> None:
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_TX:
            if dlab:
                self.dll = value
            elif self.mcr & UART_MCR_LOOP:
                self._rx.append(value)
            else:
                self._sink(bytes([value]))
                self._thr_empty_pending = True
        elif offset == UART_IER:
            if dlab:
                self.dlm = value
            else:
                enabling_thri = value & UART_IER_THRI and not self.ier & UART_IER_THRI
                self.ier = value & 0x0F
                if enabling_thri:
                    self._thr_empty_pending = True  # the transmitter is already empty
        elif offset == UART_FCR:
            self.fcr = value
            if value & UART_FCR_CLEAR_RCVR:
                self._rx.clear()
        elif offset == UART_LCR:
            self.lcr = value
        elif offset == UART_MCR:
            self.mcr = value & 0x1F
        elif offset == UART_SCR:
            self.scr = value
        self._update_irq()
