"""Reading python3 command lines for the interpreter pool (ember.agent.pyargs): pure logic."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.agent.heap import (
    THP_SETTINGS,
    default_min_free_kbytes,
    per_interpreter,
    tune_min_free,
    tune_page_reporting,
    tune_thp,
    with_malloc_env,
    without_malloc_env,
)
from ember.agent.pyargs import PyJob, effective_ctype, parse_command, plan

POOL_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "PYTHONMALLOC": "malloc"}
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def job(argv: list[str], env: dict[str, str] | None = None) -> PyJob | None:
    return plan(argv, ENV if env is None else env, pool_ctype="C.UTF-8", pool_env=POOL_ENV)


@pytest.mark.parametrize(
    ("argv", "mode", "target", "sys_argv"),
    [
        (["python3", "x.py"], "file", "x.py", ("x.py",)),
        (["python3", "x.py", "-c", "a"], "file", "x.py", ("x.py", "-c", "a")),
        (["python3", "-u", "x.py", "1"], "file", "x.py", ("x.py", "1")),
        (["python3", "--", "-weird.py"], "file", "-weird.py", ("-weird.py",)),
        (["python3", "-c", "print(1)", "a", "b"], "command", "print(1)", ("-c", "a", "b")),
        (["python3", "-cprint(1)"], "command", "print(1)", ("-c",)),
        (["python3", "-uc", "pass"], "command", "pass", ("-c",)),
        (["python3", "-Bc", "", "x"], "command", "", ("-c", "x")),
        (["python3", "-m", "json.tool", "f"], "module", "json.tool", ("-m", "f")),
        (["python3", "-mhttp.server"], "module", "http.server", ("-m",)),
        (["python3", "-I", "-m", "m", "-c"], "module", "m", ("-m", "-c")),
        (["python3"], "stdin", "", ("",)),
        (["python3", "-u"], "stdin", "", ("",)),
        (["python3", "-", "a"], "stdin", "-", ("-", "a")),
    ],
)
def test_command_lines_read_as_python3_reads_them(
    argv: list[str], mode: str, target: str, sys_argv: tuple[str, ...]
) -> None:
    command = parse_command(argv)
    assert command is not None
    assert (command.mode, command.target, command.argv) == (mode, target, sys_argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["python3", "-O", "x.py"],
        ["python3", "-OO", "-c", "pass"],
        ["python3", "-S", "x.py"],
        ["python3", "-i", "x.py"],
        ["python3", "-W", "error", "x.py"],
        ["python3", "-Wignore", "x.py"],
        ["python3", "-X", "dev", "x.py"],
        ["python3", "-b", "x.py"],
        ["python3", "-v", "-c", "pass"],
        ["python3", "-x", "x.py"],
        ["python3", "-V"],
        ["python3", "--version"],
        ["python3", "--help"],
        ["python3", "-c"],  # python3 reports the missing argument itself
        ["python3", "-uz", "x.py"],  # unknown option: python3 prints its usage
        ["python3", "-uO", "x.py"],
    ],
)
def test_what_a_started_interpreter_cannot_honour_goes_to_a_real_process(argv: list[str]) -> None:
    assert parse_command(argv) is None
    assert job(argv) is None


def test_honoured_flags_become_sys_flags_fields() -> None:
    j = job(["python3", "-I", "-B", "-q", "x.py"])
    assert j is not None
    assert j.flags == {
        "dont_write_bytecode": 1,
        "no_user_site": 1,
        "ignore_environment": 1,
        "isolated": 1,
        "safe_path": True,
        "quiet": 1,
    }
    assert j.no_user_site and j.safe_path and not j.unbuffered
    plain = job(["python3", "x.py"])
    assert plain is not None and plain.flags == {} and not plain.safe_path


def test_environment_variables_python3_reads_at_start_up() -> None:
    env = ENV | {
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "x",
        "PYTHONPATH": "a:/b",
        "PYTHONIOENCODING": "latin-1:replace",
        "PYTHONBREAKPOINT": "0",  # read later, by breakpoint() itself
    }
    j = job(["python3", "x.py"], env)
    assert j is not None
    assert j.unbuffered and j.flags == {"dont_write_bytecode": 1}
    assert j.pythonpath == ("a", "/b") and j.io_encoding == "latin-1:replace"


def test_empty_variables_count_as_unset() -> None:
    j = job(["python3", "x.py"], ENV | {"PYTHONUNBUFFERED": "", "PYTHONHASHSEED": ""})
    assert j is not None and not j.unbuffered


@pytest.mark.parametrize(
    "name", ["PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONOPTIMIZE", "PYTHONUTF8", "PYTHONHOME"]
)
def test_start_up_variables_a_pool_cannot_honour(name: str) -> None:
    assert job(["python3", "x.py"], ENV | {name: "1"}) is None
    ignored = job(["python3", "-E", "x.py"], ENV | {name: "1"})  # -E: python3 ignores it too
    assert ignored is not None and ignored.flags == {"ignore_environment": 1}


def test_isolated_mode_ignores_pythonpath() -> None:
    j = job(["python3", "-I", "x.py"], ENV | {"PYTHONPATH": "/x", "PYTHONUNBUFFERED": "1"})
    assert j is not None and j.pythonpath == () and not j.unbuffered


def test_another_locale_needs_a_real_process() -> None:
    assert effective_ctype({"LANG": "C.UTF-8", "LC_ALL": "de_DE.UTF-8"}) == "de_DE.UTF-8"
    assert effective_ctype({}) == "C"
    assert job(["python3", "x.py"], ENV | {"LC_ALL": "C"}) is None
    assert job(["python3", "x.py"], {k: v for k, v in ENV.items() if k != "LANG"}) is None


def test_the_pools_allocator_setting_is_not_the_programs_business() -> None:
    j = job(["python3", "x.py"])
    assert j is not None and j.orig_argv == ("python3", "x.py")
    # ... but a program that asks for another allocator gets a real process
    assert job(["python3", "x.py"], ENV | {"PYTHONMALLOC": "debug"}) is None


def test_heap_budget_is_shared_and_bounded_by_free_memory() -> None:
    assert per_interpreter(64, 3, available_mib=4096) == 64 << 20
    assert per_interpreter(64, 3, available_mib=214) == ((214 - 96) // 3) << 20
    assert per_interpreter(64, 3, available_mib=50) == 0
    assert per_interpreter(0, 3, available_mib=4096) == 0
    assert per_interpreter(64, 0, available_mib=4096) == 0


def test_thp_settings_go_to_the_files_that_exist(tmp_path: Path) -> None:
    (tmp_path / "khugepaged").mkdir()
    for name in THP_SETTINGS:
        (tmp_path / name).write_text("always [madvise] never\n")
    assert tune_thp(str(tmp_path)) == len(THP_SETTINGS)
    assert (tmp_path / "defrag").read_text() == "never"
    assert (tmp_path / "enabled").read_text() == "madvise"
    assert int((tmp_path / "khugepaged/scan_sleep_millisecs").read_text()) >= 3600 * 1000
    # a kernel without THP: no files, nothing done, no error
    assert tune_thp(str(tmp_path / "absent")) == 0


def test_min_free_goes_back_to_the_kernels_own_figure(tmp_path: Path) -> None:
    # mm/page_alloc.c: sqrt(16 x KiB), clamped; 512 MiB -> 2896 KiB, not THP's 25124
    assert default_min_free_kbytes(512 * 1024) == 2896
    assert default_min_free_kbytes(1024) == 128
    assert default_min_free_kbytes(64 << 30) == 262144
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:         506768 kB\nMemFree:          198388 kB\n")
    sysctl = tmp_path / "min_free_kbytes"
    sysctl.write_text("25124\n")
    assert tune_min_free(str(meminfo), str(sysctl)) == 2847
    assert sysctl.read_text() == "2847"
    # no /proc (or no such sysctl): nothing written, no error
    assert tune_min_free(str(tmp_path / "absent"), str(sysctl)) is None
    assert tune_min_free(str(meminfo), str(tmp_path / "no" / "such")) is None


def test_page_reporting_order_is_written_where_the_kernel_has_it(tmp_path: Path) -> None:
    knob = tmp_path / "page_reporting_order"
    knob.write_text("10\n")
    assert tune_page_reporting(str(knob)) is True
    assert knob.read_text() == "9"
    # a kernel without free page reporting: nothing written, no error
    assert tune_page_reporting(str(tmp_path / "no" / "such")) is False


SSE_ONLY = {
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX,-AVX2",
    "NPY_DISABLE_CPU_FEATURES": "AVX,AVX2",
    "OPENBLAS_CORETYPE": "Nehalem",
}


def test_the_heap_settings_join_inherited_glibc_tunables_and_come_off_again() -> None:
    env = ENV | SSE_ONLY
    merged = with_malloc_env(env)
    assert merged["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX,-AVX2:glibc.malloc.hugetlb=1"
    assert merged["MALLOC_ARENA_MAX"] == "1" and env == ENV | SSE_ONLY  # a copy
    without_malloc_env(merged)
    assert merged == env
    bare = with_malloc_env(ENV)
    assert bare["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    without_malloc_env(bare)
    assert bare == ENV
    # ember-init's tunables already ask for it (pvm): only the appended one comes off, so a
    # pre-started interpreter's environment still equals a request's (ember.agent.pyargs)
    init = ENV | {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX:glibc.malloc.hugetlb=1"}
    merged = with_malloc_env(init)
    without_malloc_env(merged)
    assert merged == init


def test_the_sse_only_variables_reach_every_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.agent.execute import default_env
    from ember.agent.simd import SIMD_ENV

    for name in SIMD_ENV:
        monkeypatch.delenv(name, raising=False)
    assert set(default_env()) == {"PATH", "HOME", "LANG"}
    for name, value in SSE_ONLY.items():
        monkeypatch.setenv(name, value)
    assert default_env() == default_env() | SSE_ONLY and set(SSE_ONLY) <= set(default_env())


@pytest.mark.parametrize("name", sorted(SSE_ONLY))
def test_a_program_that_wants_other_simd_settings_gets_a_real_process(name: str) -> None:
    pool_env = with_malloc_env(POOL_ENV | SSE_ONLY)
    env = ENV | SSE_ONLY

    def planned(env: dict[str, str]) -> PyJob | None:
        return plan(["python3", "x.py"], env, pool_ctype="C.UTF-8", pool_env=pool_env)

    assert planned(env) is not None
    assert planned(env | {name: "something else"}) is None
    assert planned({k: v for k, v in env.items() if k != name}) is None
