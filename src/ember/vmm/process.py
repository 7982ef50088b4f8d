"""The VMM process: a typed config becomes a machine, jailed, served, parked when idle.

One sandbox is one such process (``shared/DESIGN.md`` §2).  :func:`run` does all of it, in
this order, because each step needs the one before:

1. with a jail, continue as PID 1 of a new PID namespace (before the VM exists: KVM ties a
   VM to the process that made it, and before any thread: see ``jail.enter_pid_namespace``);
2. build the machine (:class:`~ember.vmm.config.VmConfig`) or restore a snapshot
   (:class:`~ember.vmm.config.RestoreConfig`), its console on stdout;
3. the control socket and the idle parker (both ride the event thread);
4. the jail: everything imported that will ever be (:data:`LATE_IMPORTS`, libseccomp),
   then namespaces, chroot, uid, rlimits; seccomp is installed per thread as each starts;
5. run until the guest stops; the ready file marks the moment it starts running.

Three callers, one config type, no argv in between: ``ember boot`` parses its flags into a
:class:`~ember.vmm.config.ProcessConfig` and calls :func:`run`; the zygote's forked child
calls :func:`serve` with the config it received as JSON; a fresh interpreter
(``python -m ember.vmm.process``, the launcher's cold boot) reads that JSON on stdin.

Nothing here imports the SDK or the CLI: the zygote preloads this module and forks it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ember.errors import ConfigError, EmberError
from ember.vmm.builder import build_machine, restore_machine
from ember.vmm.config import ProcessConfig, RestoreConfig, from_json
from ember.vmm.console import ConsoleSink
from ember.vmm.machine import Machine
from ember.vmm.state import StopKind, StopReason
from ember.vmm.threads import MAIN_THREAD, name_this_thread

EXIT_CRASH = 1  # the guest crashed (or the VMM could not confine itself)
EXIT_ERROR = 2  # a bad config: one "ember: error: ..." line on stderr (as the CLI's usage status)
JAIL_FILE_SLACK = 256 << 20  # console log and snapshot state on top of a RAM-sized memory file

#: The one preload list.  Modules this process imports only when a config asks for them
#: (restore, control socket, parking, the devices, the jail), and the standard-library modules
#: they import lazily.  Two steps import them all, through :func:`preload`: the jail, before
#: the chroot (nothing can be imported after it), and the zygote, before it forks (so no child
#: pays for them, and their pages are shared).  ``tests/unit/test_vmm_process.py`` derives
#: what must be here from the code: every import inside a function of a module loaded after
#: :func:`preload` must already be loaded.
LATE_IMPORTS: tuple[str, ...] = (
    "ember.vmm.control",
    "ember.vmm.profiler",
    "ember.vmm.idle",
    "ember.vmm.machine_state",
    "ember.snapshot.kvm_state",
    "ember.snapshot.memory_file",
    "ember.snapshot.format",
    "ember.devices.virtio.vsock.device",
    "ember.devices.virtio.balloon.device",
    "ember.devices.virtio.net.device",
    "ember.devices.virtio.net.tap",
    "ember.arch.x86_64.cpuid",
    "ember.jailer.jail",
    "ember.jailer.seccomp",
    "ctypes",
    "hashlib",
    "json",
)


def preload() -> None:
    """Import :data:`LATE_IMPORTS` (cheap once done: the zygote's children find them loaded)."""
    for module in LATE_IMPORTS:
        importlib.import_module(module)


def run(config: ProcessConfig) -> int:
    """Be the VMM of ``config`` until its guest stops; the process's exit status.

    Raises :class:`~ember.errors.EmberError` for a config that cannot be run (the
    message says why); :func:`serve` turns that into one line and :data:`EXIT_ERROR`.
    """
    if config.jail is not None:
        from ember.jailer import jail

        jail.enter_pid_namespace()  # from here on we are the VMM, PID 1 of its namespace
    name_this_thread(MAIN_THREAD)
    console = ConsoleSink(sys.stdout.buffer)
    machine = _make_machine(config, console)
    control = None
    confine: Callable[[str], None] | None = None
    try:
        if config.control is not None:
            from ember.vmm.control import ControlServer

            control = ControlServer(
                config.control,
                machine,
                machine.events,
                debug=config.debug_hooks,
                jailed=config.jail is not None,
            )
        wake = None
        if config.park_idle is not None:
            wake = _park_when_idle(machine, config.park_idle)
        if machine.shm is not None:
            machine.shm.serve_bell(machine.events, wake)
        if config.owner_fd is not None:
            _stop_without_owner(machine, config.owner_fd)
        if config.jail is not None:
            confine = _jail(config.jail, machine, seccomp=config.seccomp)
    except BaseException:
        machine.close()
        raise
    try:
        if config.ready_file is not None:
            # Ready before the threads start (~2 ms here): the sockets already listen, and a
            # request waits in their backlog until the events thread, confined before it
            # serves anything, takes it; a vCPU thread is confined before it runs the guest.
            _create(config.ready_file)
        reason = machine.run(timeout=config.timeout, confine=confine)
    finally:
        if control is not None:
            control.close()
    if reason.exit_status is not None:
        return reason.exit_status
    if reason.kind.clean:
        return 0
    print(f"ember: guest stopped: {reason.describe()}", file=sys.stderr)
    return EXIT_CRASH


def serve(config: ProcessConfig) -> int:
    """:func:`run`, with an error as one ``ember: error:`` line (what a crash report quotes)."""
    try:
        return run(config)
    except EmberError as exc:
        print(f"ember: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _make_machine(config: ProcessConfig, console: ConsoleSink) -> Machine:
    spec = config.machine
    if isinstance(spec, RestoreConfig):
        spec.validate()
        return restore_machine(
            spec.snapshot,
            console,
            vsock_uds=spec.vsock_uds,
            guest_cid=spec.guest_cid,
            tap=spec.tap,
            netns=spec.netns,
        )
    return build_machine(spec, console)


def _stop_without_owner(machine: Machine, fd: int) -> None:
    """Stop the VM when the pipe ``fd`` reads end of file: its launcher, the only holder of
    the write end, is gone. A cold boot's VMM runs in a session of its own without a death
    signal (``PR_SET_PDEATHSIG`` follows the forking thread, which an ``asyncio.to_thread``
    caller ends at once), so a SIGKILLed ``ember template build`` left it running."""
    os.set_blocking(fd, False)

    def on_readable() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            machine.events.remove(fd)
            machine.request_stop(StopReason(StopKind.HOST_REQUEST, "its launcher is gone"))

    machine.events.add_reader(fd, on_readable)


def _create(path: Path) -> None:
    """An empty file: only openat and close, which the main thread's filter allows."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _jail(directory: Path, machine: Machine, *, seccomp: bool) -> Callable[[str], None] | None:
    """Jail this process (the VM is built, no thread runs yet); returns the seccomp installer."""
    from ember.jailer import jail
    from ember.jailer import seccomp as filters

    if not seccomp:
        print(
            "ember: WARNING: --no-seccomp: this VMM runs WITHOUT seccomp filters; "
            "use it to debug, never for untrusted code",
            file=sys.stderr,
        )
    else:
        filters.preload()  # the library lives outside the jail
    preload()  # nothing can be imported once the root is gone
    jail.enter(directory, file_size_limit=machine.memory.size + JAIL_FILE_SLACK)
    if not seccomp:
        return None

    def confine(role: str) -> None:
        try:
            filters.install(filters.Role(role))
        except Exception as exc:  # an unfiltered VMM must not run guest code
            print(f"ember: seccomp: cannot confine the {role} thread: {exc}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(EXIT_CRASH)

    return confine


def _park_when_idle(machine: Machine, after_s: float) -> Callable[[], None]:
    """Park the VM when idle; returns what wakes it (host activity calls it)."""
    from ember.devices.virtio.net.device import Net
    from ember.devices.virtio.vsock.device import Vsock
    from ember.vmm.idle import TICK_S, IdleParker

    vsock = machine.device(Vsock)
    if vsock is None:
        raise ConfigError("--park-idle needs a vsock device: it is how the host wakes the guest")
    shm = machine.shm

    def busy() -> int:  # an open connection, or a run_code call waiting on the code rings
        return vsock.host_connections or int(shm is not None and shm.host_waiting())

    parker = IdleParker(machine, busy, after_s)
    vsock.on_host_activity = parker.wake
    net = machine.device(Net)
    if net is not None:  # a frame for the guest wakes it too
        net.on_host_activity = parker.wake
    machine.events.set_tick(TICK_S, parker.tick)
    return parker.wake


def read_config(fd: int = 0) -> ProcessConfig:
    """The config a launcher wrote to ``fd`` (JSON, to end of file); ``fd`` becomes /dev/null.

    The VMM never reads its stdin otherwise; what stays open there must not be the
    launcher's pipe or file.
    """
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)
    try:
        data = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ConfigError(f"the VMM config on stdin is not JSON: {exc}") from None
    return from_json(data)


def main() -> int:
    """``python -m ember.vmm.process`` with a :class:`ProcessConfig` as JSON on stdin."""
    try:
        config = read_config()
    except EmberError as exc:
        print(f"ember: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
