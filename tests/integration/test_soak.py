"""A short run of ``bench/soak.py``: a handful of sandboxes used and closed leave nothing
behind (processes, threads, fds, cgroups, namespaces, files) and take nothing away.

The long run is the bench (``--sandboxes 1000``); this checks the accounting itself too: a
sandbox left open must show up as leaked, or the census would prove nothing.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

from ember import Sandbox
from tests.integration.conftest import Images

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def soak_module() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the bench imports its sibling _common as a script does
    try:
        spec = importlib.util.spec_from_file_location("ember_bench_soak", BENCH / "soak.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_a_short_soak_leaks_nothing_and_loses_nothing(
    images: Images, soak_module: ModuleType
) -> None:
    report = soak_module.soak(4, 3, 2)
    assert report["errors"] == []
    for category, counts in report["census"].items():
        assert counts["leaked"] == [], category
        assert counts["lost"] == [], category
    assert report["census"]["processes"]["before"] >= 2  # this process and its zygote at least
    assert report["census"]["files"]["before"] > 0  # the template's files
    assert report["timings"]["exec_s"]["n"] == 4 * 3
    assert soak_module.clean(report)


def test_the_census_sees_a_sandbox_left_open(
    images: Images, soak_module: ModuleType, tmp_path: Path
) -> None:
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)
    try:
        state = soak_module.Soak(tmp_path)
        assert state.one(0, 1).error is None  # warm: the zygote exists before the census
        before = soak_module.take_census(tmp_path, None, state.cgroups)
        sb = Sandbox(pids=64, memory_mib=1024)
        try:
            cgroup = sb._vmm.cgroup
            assert cgroup is not None
            cgroups = [*state.cgroups, *cgroup.paths]
            during = soak_module.compare(before, soak_module.take_census(tmp_path, None, cgroups))
        finally:
            sb.close()
        after = soak_module.compare(before, soak_module.take_census(tmp_path, None, cgroups))
    finally:
        tempfile.tempdir = saved
    for category in ("processes", "fds", "cgroups", "namespaces", "files"):
        assert during[category]["leaked"], category
        assert after[category]["leaked"] == [], category
        assert after[category]["lost"] == [], category
