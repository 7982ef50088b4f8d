"""Ember's one exception tree: what users catch keeps being caught, and shows as ``ember.X``."""

from __future__ import annotations

import pickle
import traceback

import pytest

import ember
from ember import errors, protocol
from ember.client import wire
from ember.protocol import HEADER, Kind

EXPORTED_ERRORS = [
    name
    for name in ember.__all__
    if isinstance(getattr(ember, name), type) and issubclass(getattr(ember, name), BaseException)
]


def test_every_exported_error_lives_in_errors_and_shows_as_ember_x() -> None:
    assert "SnapshotError" in EXPORTED_ERRORS
    for name in EXPORTED_ERRORS:
        cls = getattr(ember, name)
        assert cls is getattr(errors, name), name
        assert cls.__module__ == "ember", name
        assert f"ember.{name}" in repr(cls), name


def test_a_traceback_names_the_public_class() -> None:
    try:
        raise ember.SandboxTimeout("the agent did not finish 'ping' within 1 s")
    except ember.SandboxTimeout as exc:
        text = "".join(traceback.format_exception(exc))
    assert "ember.SandboxTimeout: the agent did not finish" in text


def test_public_errors_survive_pickling() -> None:
    # pickle finds the class by its __module__ ("ember"), resolved lazily there.
    crashed = pickle.loads(pickle.dumps(ember.SandboxCrashed("boom", "tail")))
    assert type(crashed) is ember.SandboxCrashed and crashed.console_tail == "tail"
    snap = pickle.loads(pickle.dumps(ember.SnapshotError("bad file")))
    assert type(snap) is ember.SnapshotError


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (errors.ImageError, (errors.ConfigError, errors.EmberError)),
        (errors.SandboxCrashed, (errors.SandboxError, errors.EmberError)),
        (errors.SandboxLost, (errors.SandboxCrashed, errors.SandboxError, errors.EmberError)),
        (errors.SnapshotError, (errors.EmberError,)),
        (errors.ExecError, (errors.AgentError, errors.EmberError)),
        (errors.AgentFileNotFoundError, (errors.AgentError, FileNotFoundError, OSError)),
        (errors.AgentFileExistsError, (errors.AgentError, FileExistsError)),
        (errors.AgentPermissionError, (errors.AgentError, PermissionError)),
        (errors.AgentIsADirectoryError, (errors.AgentError, IsADirectoryError)),
        (errors.AgentNotADirectoryError, (errors.AgentError, NotADirectoryError)),
        (errors.SandboxTimeout, (errors.EmberError, TimeoutError)),
        (errors.OutputTooLarge, (errors.EmberError,)),
        (errors.ProtocolError, (errors.EmberError, protocol.ProtocolError)),
    ],
)
def test_what_users_catch_today_still_catches(
    cls: type[BaseException], bases: tuple[type[BaseException], ...]
) -> None:
    for base in bases:
        assert issubclass(cls, base), (cls, base)


def test_the_agents_error_types_map_onto_the_tree() -> None:
    assert type(errors.agent_error("FileNotFoundError", "x")) is errors.AgentFileNotFoundError
    assert type(errors.agent_error("ExecError", "x")) is errors.ExecError
    other = errors.agent_error("ValueError", "bad")
    assert type(other) is errors.AgentError and (other.type, other.message) == ("ValueError", "bad")


def test_there_is_one_host_protocol_error() -> None:
    assert ember.ProtocolError is errors.ProtocolError
    # The client's framing raises it directly: no catching protocol.ProtocolError to re-raise.
    with pytest.raises(errors.ProtocolError) as info:
        wire.parse_header(HEADER.pack(2, 77))
    assert type(info.value) is errors.ProtocolError
    with pytest.raises(errors.ProtocolError):
        wire.frame_header(Kind.DATA, bytes(protocol.MAX_FRAME + 1))
    with pytest.raises(errors.ProtocolError):
        wire.decode(b"[1]")


def test_the_docstring_draws_every_class() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        if isinstance(getattr(errors, name), type):
            assert name in doc, name
    assert "client_errors" not in doc


def test_client_errors_is_gone() -> None:
    with pytest.raises(ModuleNotFoundError):
        __import__("ember.client_errors")


def test_running_out_of_descriptors_is_one_sandbox_error_naming_the_limit() -> None:
    import errno
    import os
    import resource

    from ember.descriptors import descriptors_checked, out_of_descriptors

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = f"RLIMIT_NOFILE {soft}, hard {hard}"
    with pytest.raises(errors.SandboxError, match=expected) as info, descriptors_checked():
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    assert isinstance(info.value.__cause__, OSError)
    assert "this process's" in str(out_of_descriptors(OSError(errno.EMFILE, "x")))
    assert "the host's" in str(out_of_descriptors(OSError(errno.ENFILE, "x")))
    with pytest.raises(ConnectionResetError), descriptors_checked():  # others pass through
        raise ConnectionResetError(errno.ECONNRESET, "reset")
    assert out_of_descriptors(OSError(errno.EPIPE, "x")) is None
