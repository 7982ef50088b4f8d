"""Restores and forks keep guest memory and registers intact (issue 12, part 2).

A short run of ``bench/stress.py`` (the long one is the bench: 30/30 clean runs measured):
restores and forks of a template that holds seeded data, each re-hashing it, filling and
re-hashing fresh memory around allocator- and gc-heavy work, reading the clock files, while
the balloon moves and files stream through vsock. Any checksum mismatch, interpreter error or
``segfault``/``general protection``/``BUG``/``Oops`` on the guest console fails it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ember import templates

from .conftest import Images, ember

BENCH = Path(__file__).resolve().parents[2] / "bench" / "stress.py"


def load_stress() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ember_bench_stress", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_restores_and_forks_under_balloon_and_vsock_traffic_stay_intact(images: Images) -> None:
    stress = load_stress()
    try:
        stress.build_template(kept_mib=2)
        results = stress.stress(4, fresh_mib=1)
    finally:
        ember("template", "rm", stress.TEMPLATE)
    assert [r.kind for r in results] == ["restore", "fork", "restore", "fork"]
    assert [r.problems for r in results] == [[], [], [], []]
    assert not (templates.templates_root() / stress.TEMPLATE).exists()
