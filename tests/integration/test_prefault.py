"""Prefaulted restores on real KVM: the template build records the pages a restored sandbox's
first call writes, and every restore copies them before its guest runs.

The VMM's private pages are read from its ``/proc/PID/pagemap`` (ember.snapshot.prefault).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ember import templates
from ember.sandbox import Sandbox
from ember.snapshot import MEMORY_FILE, prefault
from tests.integration.conftest import Images, kept_snapshot


def _recorded(directory: Path) -> list[int]:
    size = (directory / MEMORY_FILE).stat().st_size
    return [p for first, n in prefault.read(directory, size) for p in range(first, first + n)]


def _private(sb: Sandbox, directory: Path) -> set[int]:
    pid = sb._vmm.vmm_pid
    assert pid is not None
    return set(prefault.written_pages(pid, directory / MEMORY_FILE))


def test_the_template_records_its_first_call_and_every_restore_copies_it(
    images: Images,
) -> None:
    found = templates.find()
    recorded = _recorded(found.dir)
    assert len(recorded) > 100  # the resume and the worker's reply write hundreds of pages
    assert found.meta["prefault_pages"] == len(recorded)
    with Sandbox() as sb:  # no call yet: the copies were made by the restore
        held = _private(sb, found.dir)
        assert set(recorded) <= held
        assert sb.run_code("6*7", timeout=120).value == "42"
        # The first call writes few pages the record missed: the record is what it writes.
        missed = _private(sb, found.dir) - set(recorded)
        assert len(missed) < len(recorded) // 2


@pytest.mark.parametrize(
    "body",
    ["garbage", '{"format": 1, "page_size": 4096, "runs": [[0, 1], [0, 1]]}'],
)
def test_a_bad_prefault_file_only_costs_the_faults(
    images: Images, template_name: str, body: str
) -> None:
    directory = kept_snapshot(template_name)
    (directory / prefault.PREFAULT_FILE).write_text(body)
    with Sandbox(template=template_name) as copy:
        assert copy.run_code("kept", timeout=120).value == "42"


def test_a_snapshots_prefault_file_is_read_by_its_restores(
    images: Images, template_name: str
) -> None:
    with Sandbox() as sb:
        sb.snapshot(template_name)
    directory = templates.templates_root() / template_name
    with Sandbox(template=template_name) as before:
        untouched = _private(before, directory)
    size = (directory / MEMORY_FILE).stat().st_size
    wanted = [p for p in range(size // 4096 - 4096, size // 4096) if p not in untouched][:64]
    assert len(wanted) == 64  # the top 16 MiB of a fresh restore is mostly unwritten
    prefault.write(directory, prefault.runs_of(wanted))
    with Sandbox(template=template_name) as after:
        assert set(wanted) <= _private(after, directory)
        assert after.run_code("6*7", timeout=120).value == "42"


def _recorded_exec(directory: Path, name: str) -> list[int]:
    size = (directory / MEMORY_FILE).stat().st_size
    runs = prefault.read(directory, size, name)
    return [p for first, n in runs for p in range(first, first + n)]


def test_the_template_records_the_first_execs_and_their_pages_are_copied_when_asked(
    images: Images,
) -> None:
    found = templates.find()
    first, second = (set(_recorded_exec(found.dir, name)) for name in prefault.EXEC_FILES)
    # A pre-started interpreter's heap and the agent's hand-over: hundreds of pages each, a
    # different interpreter each, none of them in the first calls' set (those are copied by
    # every restore already).
    assert len(first) > 100 and len(second) > 100
    assert found.meta["prefault_exec_pages"] == [len(first), len(second)]
    assert not first & second
    assert not (first | second) & set(_recorded(found.dir))
    with Sandbox() as sb:
        before = _private(sb, found.dir)
        assert len(first - before) > len(first) // 2  # not copied at restore
        assert len(second - before) > len(second) // 2
        assert sb._vmm.control("prefault-exec") == {"ok": True, "pages": len(first), "left": 1}
        assert first <= _private(sb, found.dir)
        assert len(second - _private(sb, found.dir)) > len(second) // 2  # not yet
        assert sb._vmm.control("prefault-exec") == {"ok": True, "pages": len(second), "left": 0}
        assert second <= _private(sb, found.dir)
        assert sb._vmm.control("prefault-exec")["pages"] == 0  # none left
        result = sb.exec(["python3", "-c", "import sys; print(sys.argv[0])"], timeout=120)
        assert (result.exit_code, result.stdout) == (0, b"-c\n")


def test_a_sandboxs_first_execs_ask_for_the_copies(images: Images) -> None:
    found = templates.find()
    first, second = (set(_recorded_exec(found.dir, name)) for name in prefault.EXEC_FILES)
    with Sandbox() as sb:
        assert sb.ping()["worker"] == "ready"  # a call that is no exec copies nothing
        assert len(first - _private(sb, found.dir)) > len(first) // 2
        assert sb.exec(["python3", "-c", "pass"], timeout=120).exit_code == 0
        assert first <= _private(sb, found.dir)
        assert not sb._vmm.exec_prefaulted
        assert len(second - _private(sb, found.dir)) > len(second) // 2  # the next exec's
        assert sb.exec(["true"], timeout=120).exit_code == 0
        assert second <= _private(sb, found.dir)
        assert sb._vmm.exec_prefaulted
        assert sb._vmm.control("prefault-exec")["pages"] == 0  # already done by the execs
