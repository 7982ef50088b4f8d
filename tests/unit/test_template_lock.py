"""A template build that waited for another one uses what that one made (no KVM).

``ember template build`` takes minutes here, so a second build of the same template (two
terminals, two first ``Sandbox()`` calls in fresh processes) must not start over once the
first one is done. The boot is replaced by one that fails the test if it is reached.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ember import templates
from ember.images import cache
from ember.snapshot import STATE_FILE
from ember.spec import SandboxSpec


class Booted(Exception):
    """The build went on to boot a guest."""


@pytest.fixture
def boots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[SandboxSpec]:
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(templates.TEMPLATES_ENV, str(tmp_path / "templates"))
    monkeypatch.setattr(templates, "default_key", lambda spec: "inputs-now")
    monkeypatch.setattr(templates, "verify", lambda directory: None)
    booted: list[SandboxSpec] = []

    def boot(spec: SandboxSpec) -> None:
        booted.append(spec)
        raise Booted

    monkeypatch.setattr(templates, "VmmProcess", boot)
    return booted


def made(name: str, inputs: str | None, created: float) -> Path:
    """What a finished build (or ``sb.snapshot``) leaves in the templates directory."""
    directory = templates.templates_root() / name
    directory.mkdir(parents=True)
    (directory / STATE_FILE).write_bytes(b"state")
    meta = {"name": name, "created": created, **({"inputs": inputs} if inputs else {})}
    (directory / templates.META_FILE).write_text(json.dumps(meta))
    return directory


def test_a_build_that_waited_for_the_lock_takes_the_template_the_other_build_made(
    boots: list[SandboxSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = threading.Event()
    real_lock = templates.build_lock

    @contextmanager
    def lock(key: str) -> Iterator[None]:
        waiting.set()
        with real_lock(key):
            yield

    monkeypatch.setattr(templates, "build_lock", lock)
    found: list[templates.Template] = []
    with real_lock("template-lean"):  # the first build holds it
        second = threading.Thread(target=lambda: found.append(templates.build("lean")))
        second.start()
        assert waiting.wait(10)
        time.sleep(0.1)
        directory = made("lean", "inputs-now", created=123.0)  # ... and finishes
    second.join(10)
    assert not boots
    assert found and found[0].dir == directory and found[0].meta["created"] == 123.0


def test_a_stale_template_or_force_is_built_again(boots: list[SandboxSpec]) -> None:
    directory = made("lean", "inputs-then", created=1.0)
    with pytest.raises(Booted):
        templates.build("lean")
    made("other", "inputs-now", created=1.0)
    with pytest.raises(Booted):
        templates.build("other", force=True)
    assert len(boots) == 2
    assert not directory.with_name("lean.tmp").exists()  # the failed build's staging went
    assert json.loads((directory / templates.META_FILE).read_text())["created"] == 1.0


def test_a_template_saved_from_a_sandbox_is_kept_as_it_is(boots: list[SandboxSpec]) -> None:
    made("mine", None, created=5.0)
    assert templates.build("mine").meta["created"] == 5.0
    assert not boots
