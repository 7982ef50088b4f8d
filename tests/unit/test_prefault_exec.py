"""The SDK's side of a first exec's copies: VmmHandle.prefault_exec asks the VMM once, and a
VMM that cannot answer costs the exec nothing (the exec itself reports a dead VM)."""

from __future__ import annotations

from typing import Any

import pytest

from ember.errors import EmberError, SandboxCrashed
from ember.vmm_handle import VmmHandle


class _Handle(VmmHandle):
    def __init__(self, failure: Exception | None = None) -> None:
        self.asked: list[str] = []
        self.failure = failure

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        self.asked.append(op)
        if self.failure is not None:
            raise self.failure
        return {"ok": True, "pages": 1300}


def test_the_vmm_is_asked_once_per_sandbox() -> None:
    handle, other = _Handle(), _Handle()
    assert not handle.exec_prefaulted
    handle.prefault_exec()
    handle.prefault_exec()
    assert handle.asked == ["prefault-exec"]
    assert handle.exec_prefaulted
    assert not other.exec_prefaulted  # a class default, not shared state
    other.prefault_exec()
    assert other.asked == ["prefault-exec"]


@pytest.mark.parametrize(
    "failure",
    [SandboxCrashed("the sandbox is not running"), EmberError("unknown op 'prefault-exec'")],
)
def test_a_vmm_that_cannot_copy_is_not_asked_again(failure: Exception) -> None:
    handle = _Handle(failure)
    handle.prefault_exec()  # no exception: the exec that follows says what is wrong
    handle.prefault_exec()
    assert handle.asked == ["prefault-exec"]


def test_anything_but_an_ember_error_still_surfaces() -> None:
    handle = _Handle(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        handle.prefault_exec()
