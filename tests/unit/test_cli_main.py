"""The ``ember`` entry point: each subcommand imports only the module that owns it."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from ember.cli import main as cli_main


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def test_the_owner_table_names_every_subcommand_and_only_its_module_registers_it() -> None:
    every = _subcommands(cli_main.build_parser())
    assert every == set(cli_main.OWNER)
    for command, module in cli_main.OWNER.items():
        alone = _subcommands(cli_main.build_parser(command))
        assert command in alone
        siblings = {c for c, m in cli_main.OWNER.items() if m == module}
        assert alone == siblings, (command, alone)


def test_an_unknown_command_gets_the_whole_list() -> None:
    assert _subcommands(cli_main.build_parser("no-such-command")) == set(cli_main.OWNER)
    with pytest.raises(SystemExit):
        cli_main.main(["no-such-command"])


def test_ember_run_imports_neither_the_image_builder_nor_the_vmm_parser() -> None:
    probe = (
        "import sys\n"
        "from ember.cli.main import build_parser\n"
        "build_parser('run').parse_args(['run', 'x.py'])\n"
        "print(sorted(m for m in sys.modules if m.startswith(('ember.cli.', 'ember.images'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert "'ember.cli.run'" in out
    for heavy in ("ember.cli.image", "ember.cli.boot", "ember.cli.shell", "ember.images.layers"):
        assert f"'{heavy}'" not in out, out


UNWIND = """
import signal, sys, time
from ember.cli import main
if sys.argv[1] == "kept":
    signal.signal(signal.SIGTERM, lambda *_: print("theirs", flush=True) or sys.exit(5))
with main._unwind_on_sigterm():
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        print("unwound", flush=True)
"""


@pytest.mark.parametrize("handler", ["default", "kept"])
def test_sigterm_unwinds_the_command_unless_a_handler_is_set(handler: str) -> None:
    """What `ember template build` needs to close its booting VMM when it is killed."""
    import os
    import signal
    from pathlib import Path

    src = str(Path(cli_main.__file__).resolve().parents[2])
    child = subprocess.Popen(
        [sys.executable, "-c", UNWIND, handler],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=30)
    if handler == "default":
        assert (out, child.returncode) == (b"unwound\n", 128 + signal.SIGTERM)
    else:
        assert (out, child.returncode) == (b"theirs\nunwound\n", 5)


def test_the_command_gives_sigterm_back_as_it_found_it() -> None:
    """A process that calls main() and forks afterwards (pytest's workers do) must not hand
    its children the unwinding handler: their SIGTERM would raise SystemExit inside a copy of
    the parent's stack, and the child would run on instead of dying (test_adopt saw it)."""
    import signal

    found = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whatever an earlier test left
    try:
        seen: list[object] = []
        with cli_main._unwind_on_sigterm():
            seen.append(signal.getsignal(signal.SIGTERM))
        assert seen[0] not in (signal.SIG_DFL, signal.SIG_IGN) and callable(seen[0])
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        with pytest.raises(SystemExit):
            cli_main.main(["no-such-command"])  # argparse's exit unwinds through main as well
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        kept = signal.signal(signal.SIGTERM, signal.default_int_handler)
        with cli_main._unwind_on_sigterm():  # a handler already set is neither replaced nor
            assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler  # ... removed
        signal.signal(signal.SIGTERM, kept)
    finally:
        signal.signal(signal.SIGTERM, found)
