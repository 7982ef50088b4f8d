"""The SDK's side of the first execs' copies: VmmHandle.prefault_exec asks the VMM before each
exec while it has sets left, and a VMM that cannot answer costs the exec nothing (the exec
itself reports a dead VM)."""

from __future__ import annotations

from typing import Any

import pytest

from ember.errors import EmberError, SandboxCrashed
from ember.vmm_handle import VmmHandle


class _Handle(VmmHandle):
    def __init__(self, sets: int = 2, failure: BaseException | None = None) -> None:
        self.asked: list[str] = []
        self.sets = sets
        self.failure = failure

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        self.asked.append(op)
        if self.failure is not None:
            raise self.failure
        if not self.sets:
            return {"ok": True, "pages": 0, "left": 0}
        self.sets -= 1
        return {"ok": True, "pages": 1200, "left": self.sets}


def test_the_vmm_is_asked_until_no_set_is_left() -> None:
    handle, other = _Handle(sets=2), _Handle(sets=1)
    assert not handle.exec_prefaulted
    handle.prefault_exec()
    assert not handle.exec_prefaulted  # one set left: the next exec asks again
    handle.prefault_exec()
    assert handle.exec_prefaulted
    handle.prefault_exec()
    assert handle.asked == ["prefault-exec"] * 2
    assert not other.exec_prefaulted  # a class default, not shared state
    other.prefault_exec()
    other.prefault_exec()
    assert other.asked == ["prefault-exec"]


def test_a_vmm_with_nothing_recorded_is_asked_once() -> None:
    handle = _Handle(sets=0)
    handle.prefault_exec()
    handle.prefault_exec()
    assert handle.asked == ["prefault-exec"]


def test_an_old_vmms_reply_without_a_count_ends_the_asking() -> None:
    class _Old(_Handle):
        def control(self, op: str, **args: Any) -> dict[str, Any]:
            self.asked.append(op)
            return {"ok": True, "pages": 1200}

    handle = _Old()
    handle.prefault_exec()
    handle.prefault_exec()
    assert handle.asked == ["prefault-exec"]


@pytest.mark.parametrize(
    "failure",
    [SandboxCrashed("the sandbox is not running"), EmberError("unknown op 'prefault-exec'")],
)
def test_a_vmm_that_cannot_copy_is_not_asked_again(failure: Exception) -> None:
    handle = _Handle(failure=failure)
    handle.prefault_exec()  # no exception: the exec that follows says what is wrong
    handle.prefault_exec()
    assert handle.asked == ["prefault-exec"]


def test_anything_but_an_ember_error_still_surfaces() -> None:
    handle = _Handle(failure=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        handle.prefault_exec()
