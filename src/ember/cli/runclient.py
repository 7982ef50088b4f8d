"""The run daemon's client: ``ember run``/``ember exec`` in ~40 ms of Python, not ~75.

Why: through the run daemon (:mod:`ember.cli.runner`) the CLI process only sends one request
and prints the frames that come back, yet it used to pay for the whole CLI first: argparse
building the run parser, ``pathlib``, ``subprocess``, ``typing``, the exception tree. That
was ~35 ms on top of Python's own ~20 ms start on this host, in every run. This module is
what such a run needs and nothing more (``os``, ``sys``, ``socket``, ``struct``, ``binascii``
and the C half of ``json``), and the other half of the daemon's wire format. ``import json``
and ``import base64`` are not among them: both import ``re`` (with ``json.decoder``,
``json.scanner``, ``json.encoder``): ~6-7 ms more of every run's start here, for a request of
a few fixed types (:func:`json_text`) and an exit status (:func:`end_payload`).

:func:`fast_main` takes the command lines users type most, parsed by :func:`parse`::

    ember run [--timeout S] [--template NAME] SCRIPT [ARGS...]
    ember exec [--timeout S] [--template NAME] [--] CMD [ARGS...]

and sends them to a daemon that is listening. Anything else (another option, ``-h``, a
script it cannot read) and any run the daemon does not take (none listening, a stale one, one
that went away before printing) is None, and ``ember.cli.main`` goes on as it always did: it
parses the same words with argparse and calls :func:`send` again, so errors, fallbacks and
the new daemon are the full CLI's own. :func:`parse` never accepts a command line that
argparse reads differently: ``tests/unit/test_runclient.py`` sends both to a fake daemon and
compares the requests, byte for byte.
"""

from __future__ import annotations

import binascii
import os
import socket
import struct
import sys

try:  # the C function json.dumps uses for a str with ensure_ascii (CPython's json)
    from _json import encode_basestring_ascii as _json_str
except ImportError:  # another Python: the same text, at the cost of the import
    from json import dumps as _json_str

from ember.cli import is_positive_seconds  # the package, already imported: no cost

TYPE_CHECKING = False
if TYPE_CHECKING:  # no run-time import: ``typing`` alone is ~3 ms of this client's start
    from typing import Any, BinaryIO

ENABLE_ENV = "EMBER_RUNNER"
DIR_ENV = "EMBER_RUNNER_DIR"
SOCKET = "run.sock"
MAX_SCRIPT = 8 << 20  # bigger scripts go in-process (the request is one JSON line)
CONNECT_TIMEOUT_S = 1.0
GUEST_DIR = "/tmp/ember-run"  # where ``ember run`` puts the script: ember.protocol.RUN_DIR
# Frames the daemon sends: a kind byte, a 4-byte big-endian length, the payload.
STDOUT, STDERR, END, STALE = b"O", b"E", b"X", b"S"
HEADER = struct.Struct(">cI")
# ``Sandbox()`` keywords a run may set, and their values when no option sets them (the CLI's
# defaults: ``ember.cli.run.common_options`` takes them from here).
SHAPE_DEFAULTS: dict[str, Any] = {
    "mem_mib": None, "vcpus": 1, "cpus": None, "memory_mib": None, "pids": None,
    "template": None,
}  # fmt: skip


class NotTaken(Exception):
    """The daemon did not take the run, and nothing was printed: run it in-process.
    ``restart``: a new daemon is wanted (none listens, or it runs other code)."""

    def __init__(self, restart: bool) -> None:
        super().__init__("the run daemon did not take the run")
        self.restart = restart


def runner_dir() -> str:
    """The daemon's directory: ``$EMBER_RUNNER_DIR``, else ``~/.cache/ember/run``."""
    return os.environ.get(DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "ember", "run"
    )


def socket_path(directory: str | os.PathLike[str] | None = None) -> str:
    """Where the daemon of ``directory`` (default :func:`runner_dir`) listens: one name for
    the daemon, its client, the CLI's pre-start, the benchmark and the tests."""
    return os.path.join(runner_dir() if directory is None else directory, SOCKET)


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0" and not os.environ.get("EMBER_SERVER")


def fingerprint() -> str:
    """The installed ``ember`` package as files (~2 ms): a daemon running older code differs."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    count = size = newest = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                st = os.stat(os.path.join(directory, name))
                count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return f"{root}:{count}:{size}:{newest}"


def script_command(name: str, args: list[str]) -> list[str]:
    """``ember run``'s command in the guest: the script ``name`` uploaded to :data:`GUEST_DIR`."""
    return ["python3", f"{GUEST_DIR}/{name}", *args]


def request(
    argv: list[str], options: dict[str, Any], timeout: float | None,
    upload: tuple[str, bytes] | None,
) -> bytes:  # fmt: skip
    """The one line a run is to the daemon (which reads it with ``json.loads``)."""
    sent = None
    if upload is not None:  # base64, as base64.b64encode writes it
        sent = [upload[0], binascii.b2a_base64(upload[1], newline=False).decode("ascii")]
    body = {
        "fingerprint": fingerprint(), "argv": argv, "options": options, "timeout": timeout,
        "upload": sent,
    }  # fmt: skip
    return json_text(body).encode() + b"\n"


def json_text(value: object) -> str:
    """``json.dumps(value)`` for what a request holds (None, bool, int, finite float, str,
    list, dict with str keys), without importing :mod:`json`."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        return _json_str(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        import math  # as is_positive_seconds does: only a timeout is a float

        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not JSON")
        return float.__repr__(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(json_text(item) for item in value) + "]"
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"a JSON object's keys are strings, not {key!r}")
            items.append(f"{_json_str(key)}: {json_text(item)}")
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"{type(value).__name__} is not part of a run request")


def end_payload(code: int, message: str) -> bytes:
    """The END frame's payload: the run's exit status in decimal, a newline, the message."""
    return f"{int(code)}\n{message}".encode("utf-8", "replace")


def read_end(payload: bytes) -> tuple[int, str]:
    """:func:`end_payload`'s status and message; ValueError if it is not one."""
    status, newline, message = payload.partition(b"\n")
    if not newline:
        raise ValueError("an END frame without its newline")
    return int(status), message.decode("utf-8", "replace")


def send(line: bytes, out: BinaryIO, err: BinaryIO) -> int:
    """Send a :func:`request` to the daemon and print what it sends back; the run's exit
    status. :class:`NotTaken` if it did not take the run; ConnectionError if it went away
    after printing (running it again would print that twice)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(socket_path())
            sock.settimeout(None)
        except OSError:
            raise NotTaken(restart=True) from None
        try:
            sock.sendall(line)
        except OSError:
            raise NotTaken(restart=False) from None
        return _print_frames(sock, out, err)


def _print_frames(sock: socket.socket, out: BinaryIO, err: BinaryIO) -> int:
    printed = False
    while True:
        try:
            kind, length = HEADER.unpack(_recv_exact(sock, HEADER.size))
            payload = _recv_exact(sock, length)
        except OSError:
            if printed:
                raise  # output went out: running it again would print it twice
            raise NotTaken(restart=False) from None  # went away first (an idle exit)
        if kind in (STDOUT, STDERR):
            printed = True
            target = out if kind == STDOUT else err
            target.write(payload)
            target.flush()
        elif kind == END:
            try:
                code, message = read_end(payload)
            except ValueError:
                bad = f"the run daemon sent a bad END frame {payload[:80]!r}"
                raise ConnectionError(bad) from None
            if message:
                print(message, file=sys.stderr)
            return code
        elif kind == STALE:
            raise NotTaken(restart=True)
        else:
            raise ConnectionError(f"the run daemon sent an unknown frame {kind!r}")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the run daemon hung up")
        data += chunk
    return bytes(data)


# --- the fast path


def parse(words: list[str]) -> tuple[list[str], str | None, dict[str, Any], float | None] | None:
    """``(argv, script, options, timeout)`` for a command line :func:`fast_main` takes
    (``script``: the local file ``ember run`` uploads; None for ``exec``), else None."""
    if not words or words[0] not in ("run", "exec"):
        return None
    options = dict(SHAPE_DEFAULTS)
    timeout: float | None = None
    rest = words[1:]
    while rest and rest[0].startswith("-") and rest[0] != "--":
        option, eq, value = rest[0].partition("=")
        if not eq:
            if len(rest) < 2 or rest[1].startswith("-"):
                return None  # argparse's to judge (a negative number, a missing value)
            value, rest = rest[1], rest[2:]
        else:
            rest = rest[1:]
        if option == "--timeout":
            try:
                timeout = float(value)
            except ValueError:
                return None
            if not is_positive_seconds(timeout):
                return None  # argparse's to refuse, in its words
        elif option == "--template" and value:
            options["template"] = value
        else:
            return None
    command = rest[1:] if words[0] == "exec" and rest[:1] == ["--"] else rest
    if "--" in command:
        return None  # argparse drops some and keeps others: its to judge
    if words[0] == "run":
        if not rest or rest[0].startswith("-"):
            return None
        name = os.path.basename(rest[0])
        if name in ("", ".", ".."):
            return None
        return script_command(name, rest[1:]), rest[0], options, timeout
    if not command:
        return None
    return command, None, options, timeout


def fast_main(words: list[str]) -> int | None:
    """The run's exit status if a listening daemon took it; None: the full CLI's to run."""
    if not enabled():
        return None
    parsed = parse(words)
    if parsed is None:
        return None
    argv, script, options, timeout = parsed
    upload = None
    if script is not None:
        try:
            with open(script, "rb") as f:
                source = f.read(MAX_SCRIPT + 1)
        except OSError:
            return None  # the full CLI says why, in its own words
        if len(source) > MAX_SCRIPT:
            return None
        upload = (argv[1], source)
    try:
        return send(request(argv, options, timeout, upload), sys.stdout.buffer, sys.stderr.buffer)
    except NotTaken:
        return None
