"""Templates with packages, without a guest: layer keys, failures, preload plumbing, progress.

The build steps that need the network or root (pip, the chroot install) are
replaced by small fake commands, so a failure's message and clean-up are
checked exactly as a user would meet them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from ember import Sandbox, templates
from ember.agent import __main__ as agent_main
from ember.agent import preload
from ember.cli.main import main as ember_main
from ember.errors import BuildError, ConfigError
from ember.images import layers, packages, rootfs
from ember.images.packages import LayerInputs, PackageSpec, layer_chain
from ember.images.progress import Progress
from ember.images.rich_progress import RichProgress
from ember.spec import MAX_POOL, SandboxSpec, agent_argv, resolve_preload

BASE = "b" * 64


def quiet() -> Progress:
    return Progress(io.StringIO(), tty=False)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("EMBER_CACHE_DIR", str(root))
    return root


def script(path: Path, body: str) -> Path:
    """An executable Python script (a stand-in for pip or the chroot step)."""
    path.write_text(f"#!{sys.executable}\nimport os, sys\n{body}\n")
    path.chmod(0o755)
    return path


# -- keys ----------------------------------------------------------------------------------


def test_layer_key_is_of_what_was_asked_for(tmp_path: Path) -> None:
    spec = PackageSpec(pip=("requests==2.32.3", "six"), apt=("jq", "curl"))
    key = LayerInputs.from_spec(BASE, spec).key()
    same = PackageSpec(pip=("six", " requests==2.32.3"), apt=("curl", "jq", "jq"))
    assert LayerInputs.from_spec(BASE, same).key() == key  # order and repeats do not matter
    for other in (
        PackageSpec(pip=("requests==2.32.4", "six"), apt=("jq", "curl")),
        PackageSpec(pip=("requests==2.32.3", "six"), apt=("jq",)),
        PackageSpec(pip=("requests==2.32.3",), apt=("jq", "curl")),
    ):
        assert LayerInputs.from_spec(BASE, other).key() != key
    assert LayerInputs.from_spec("c" * 64, spec).key() != key  # another layer below


def test_requirements_files_count_by_content_and_local_wheels_by_bytes(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("six\n")
    copy = tmp_path / "other-name.txt"
    copy.write_text("six\n")
    key = LayerInputs.from_spec(BASE, PackageSpec(requirements=(req,))).key()
    assert LayerInputs.from_spec(BASE, PackageSpec(requirements=(copy,))).key() == key
    req.write_text("six==1.17.0\n")
    assert LayerInputs.from_spec(BASE, PackageSpec(requirements=(req,))).key() != key

    wheel = tmp_path / "a" / "probe-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"one")
    moved = tmp_path / "b" / wheel.name
    moved.parent.mkdir()
    moved.write_bytes(b"one")
    key = LayerInputs.from_spec(BASE, PackageSpec(pip=(str(wheel),))).key()
    assert LayerInputs.from_spec(BASE, PackageSpec(pip=(str(moved),))).key() == key
    wheel.write_bytes(b"two")  # rebuilt with the same name: a new layer
    assert LayerInputs.from_spec(BASE, PackageSpec(pip=(str(wheel),))).key() != key


def test_the_default_image_has_the_numpy_layer_and_packages_add_one_over_it() -> None:
    default = layer_chain(BASE, None)
    assert [layer.pip for layer in default] == [packages.DEFAULT_PIP]
    chain = layer_chain(BASE, PackageSpec(pip=("six",)))
    assert chain[0] == default[0] and chain[1].parent == default[0].key()
    assert layer_chain(BASE, PackageSpec()) == default

    image = rootfs.ImageInputs.current()
    assert rootfs.ImageInputs.current(PackageSpec()).key() == image.key()
    with_six = rootfs.ImageInputs.current(PackageSpec(pip=("six",)))
    assert with_six.key() != image.key()
    assert dataclasses.replace(image, layers=()).key() != image.key()
    assert rootfs.image_path().parent.name == image.key()
    assert rootfs.image_path().parent.parent.name == "rootfs"  # where restores may attach from


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"apt": ("Bad Name",)}, "not a Debian package name"),
        ({"requirements": (Path("/nonexistent/req.txt"),)}, "no such file"),
        ({"pip": ("./missing.whl",)}, "no such file or directory"),
        ({"pip": ("--index-url=http://x",)}, "give a requirement"),
    ],
)
def test_bad_package_arguments_are_config_errors(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PackageSpec(**spec)  # type: ignore[arg-type]


def test_local_paths_and_preload_names() -> None:
    assert packages.is_local("./dist/x.whl") and packages.is_local("/tmp/proj")
    assert packages.is_local("x-1.0.tar.gz")
    assert not packages.is_local("numpy>=2") and not packages.is_local("pkg @ https://h/x.whl")
    assert packages.check_modules(["numpy", "a.b_c", "numpy"]) == ("numpy", "a.b_c")
    with pytest.raises(ConfigError, match="not a Python module name"):
        packages.check_modules(["numpy pandas"])
    assert packages.preload_for(["pandas", "numpy"]) == (*packages.DEFAULT_PRELOAD, "pandas")
    assert packages.DEFAULT_PRELOAD[0] == "numpy" and "json" in packages.DEFAULT_PRELOAD


# -- building a layer: failures are one line and leave nothing -----------------------------


def _no_layer_left(cache_dir: Path) -> bool:
    kind = cache_dir / layers.LAYER_KIND
    return not kind.exists() or not any(kind.iterdir())


def test_a_package_pip_cannot_find_fails_in_one_line(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = script(
        tmp_path / "pip",
        'print("Looking in indexes: https://pypi.org/simple")\n'
        'print("ERROR: Could not find a version that satisfies the requirement nosuchpkg")\n'
        'print("ERROR: No matching distribution found for nosuchpkg")\n'
        "sys.exit(1)",
    )
    monkeypatch.setattr(layers, "host_pip", lambda: [str(fake)])
    inputs = LayerInputs.from_spec(BASE, PackageSpec(pip=("nosuchpkg",)))
    with pytest.raises(BuildError) as info:
        layers.build_layer(inputs, [tmp_path], quiet())
    message = str(info.value)
    assert "\n" not in message
    assert "pip failed: ERROR: Could not find a version" in message and "nosuchpkg" in message
    assert _no_layer_left(cache_dir)


def test_a_failing_install_step_fails_in_one_line_and_is_not_cached(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_pip = script(tmp_path / "pip", "sys.exit(0)")
    fake_install = script(
        tmp_path / "install",
        'print("Reading package lists...")\n'
        'print("E: Unable to locate package nosuchpkg")\n'
        "sys.exit(100)",
    )
    monkeypatch.setattr(layers, "host_pip", lambda: [str(fake_pip)])
    monkeypatch.setattr(layers, "pip_package_dir", lambda: tmp_path)
    monkeypatch.setattr(layers, "in_mount_namespace", lambda _s, args: [str(fake_install), *args])
    inputs = LayerInputs.from_spec(BASE, PackageSpec(pip=("six",), apt=("nosuchpkg",)))
    with pytest.raises(BuildError, match=r"^installing six, apt nosuchpkg failed: E: Unable"):
        layers.build_layer(inputs, [tmp_path], quiet())
    assert _no_layer_left(cache_dir)


def test_a_built_layer_is_installed_whole_then_found_in_the_cache(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    fake_pip = script(tmp_path / "pip", "sys.exit(0)")
    # args: lowerdir upper work merged pip-dir wheels apt [pip args]: "install" into upper
    fake_install = script(
        tmp_path / "install",
        f"open({str(runs)!r}, 'a').write('x')\n"
        "site = os.path.join(sys.argv[2], 'usr/local/lib/python3.11/dist-packages')\n"
        "os.makedirs(os.path.join(site, 'six-1.17.0.dist-info'))\n"
        "open(os.path.join(site, 'six.py'), 'w').write('')",
    )
    monkeypatch.setattr(layers, "host_pip", lambda: [str(fake_pip)])
    monkeypatch.setattr(layers, "pip_package_dir", lambda: tmp_path)
    monkeypatch.setattr(layers, "in_mount_namespace", lambda _s, args: [str(fake_install), *args])
    inputs = LayerInputs.from_spec(BASE, PackageSpec(pip=("six",)))
    upper = layers.build_layer(inputs, [tmp_path], quiet())
    assert upper == layers.layer_dir(inputs) / "upper"
    assert (upper / layers.GUEST_SITE / "six.py").is_file()
    assert sorted(p.name for p in upper.parent.iterdir()) == ["complete", "layer.json", "upper"]
    assert layers.installed(upper) == {"six": "1.17.0"}
    assert layers.build_layer(inputs, [tmp_path], quiet()) == upper
    assert runs.read_text() == "x"  # the second call was a cache hit


def test_an_overlay_cannot_stack_a_path_with_a_colon(tmp_path: Path) -> None:
    assert layers.lowerdir_option([tmp_path / "a", tmp_path / "b"]) == f"{tmp_path}/b:{tmp_path}/a"
    with pytest.raises(BuildError, match="cannot stack"):
        layers.lowerdir_option([tmp_path / "a:b"])


# -- the CLI -----------------------------------------------------------------------------------


def test_the_default_template_takes_no_packages(capsys: pytest.CaptureFixture[str]) -> None:
    assert ember_main(["template", "build", "--pip", "six"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "default template's packages are fixed" in err


def test_a_bad_preload_name_is_refused_before_any_build(capsys: pytest.CaptureFixture[str]) -> None:
    assert ember_main(["template", "build", "sci", "--preload", "not a module"]) == 2
    assert "not a Python module name" in capsys.readouterr().err


# -- preload: template option -> agent argv -> EMBER_PRELOAD -> interpreters ---------------


def test_preload_defaults_follow_the_image(tmp_path: Path) -> None:
    assert resolve_preload(SandboxSpec()) == packages.DEFAULT_PRELOAD
    assert agent_argv(SandboxSpec())[-2:] == ("--preload", ",".join(packages.DEFAULT_PRELOAD))
    custom = SandboxSpec(rootfs=tmp_path / "rootfs.ext4")
    assert resolve_preload(custom) == () and "--preload" not in agent_argv(custom)
    both = SandboxSpec(rootfs=tmp_path / "r.ext4", preload=("numpy", "json"))
    assert agent_argv(both)[-1] == "numpy,json"


# -- pool and heap: template options -> agent argv -> the agent's own parser --------------


def test_pool_and_heap_reach_the_agent_and_the_key() -> None:
    lean = SandboxSpec(pool=1, heap_mib=16)
    argv = agent_argv(lean)
    assert argv[-4:] == ("--pool", "1", "--heap-mib", "16")
    assert argv[:-4] == agent_argv(SandboxSpec())  # the default's command line, unchanged
    # the guest's parser takes exactly what the host writes
    options = agent_main._parse(list(argv[3:]))
    assert options is not None and (options["pool"], options["heap-mib"]) == ("1", "16")
    none = SandboxSpec(pool=0, heap_mib=0)
    assert agent_argv(none)[-4:] == ("--pool", "0", "--heap-mib", "0")
    keys = {templates.default_key(s) for s in (SandboxSpec(), lean, none)}
    assert len(keys) == 3  # a template is rebuilt when its pool or heap changes


@pytest.mark.parametrize(
    "fields",
    [{"pool": -1}, {"pool": MAX_POOL + 1}, {"heap_mib": -1}, {"heap_mib": 513, "mem_mib": 512}],
)
def test_pool_and_heap_out_of_range_are_refused(fields: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match=r"^(pool|heap_mib)="):
        SandboxSpec(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mem_mib": 31}, "mem_mib=31: from 32 to"),
        ({"mem_mib": -5}, "mem_mib=-5: from 32 to"),
        ({"mem_mib": (1 << 20) + 1}, "to 1048576 MiB"),
        ({"vcpus": 0}, "vcpus=0: from 1 to 32"),
        ({"vcpus": 33}, "vcpus=33: from 1 to 32"),
        ({"vcpus": 1.5}, "vcpus must be a whole number, not 1.5"),
        ({"vcpus": True}, "vcpus must be a whole number, not True"),
        ({"mem_mib": "512"}, "mem_mib must be a whole number, not '512'"),
    ],
)
def test_guest_sizes_out_of_range_are_refused_before_any_template_build(
    fields: dict[str, int], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A size no template has yet would otherwise start building one (minutes here) and
    fail only when its VMM checked the size."""

    def build(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a template build started")

    monkeypatch.setattr(templates, "build", build)
    monkeypatch.setattr(templates, "start_vmm", build)
    with pytest.raises(ConfigError, match=message):
        SandboxSpec(**fields)
    with pytest.raises(ConfigError, match=message):
        Sandbox(**fields)  # type: ignore[arg-type]
    assert SandboxSpec(mem_mib=32, vcpus=32).mem_mib == 32  # the bounds themselves are fine


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["template", "build", "--pool", "1"], "default template's interpreters are fixed"),
        (["template", "build", "lean", "--pool", "-1"], "must be at least 0, got -1"),
        (["template", "build", "lean", "--heap-mib", "lots"], "not a whole number: 'lots'"),
        (["template", "build", "lean", "--pool", "99"], f"to {MAX_POOL}"),
    ],
)
def test_bad_pool_options_are_refused_before_any_build(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = ember_main(argv)
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_preload_imports_what_it_can_and_records_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    monkeypatch.setattr(preload, "failed", {})
    env = {preload.ENV: "colorsys, ember_no_such_module ,"}
    assert preload.modules(env) == ["colorsys", "ember_no_such_module"]
    assert preload.import_from_env(env) == ["colorsys"]
    assert "colorsys" in sys.modules
    assert preload.failed["ember_no_such_module"].startswith("ModuleNotFoundError")


def test_the_template_key_covers_the_preload_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from ember import templates

    fixed = (Path("/k"), Path("/r"), Path("/i"))
    monkeypatch.setattr(templates, "resolve_images", lambda _spec: fixed)
    key = templates.default_key(SandboxSpec())
    assert templates.default_key(SandboxSpec(preload=packages.DEFAULT_PRELOAD)) == key
    assert templates.default_key(SandboxSpec(preload=("numpy",))) != key


# -- progress --------------------------------------------------------------------------------


def test_rich_progress_rows(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with RichProgress(console) as progress:
        with progress.step("pip: fetch numpy"):
            progress.transfer(8_000_000, 16_000_000)
            progress.status("pip: Collecting numpy")
        progress.note("rootfs layer: cached")
        with pytest.raises(RuntimeError), progress.step("pack"):
            raise RuntimeError("boom")
    text = out.getvalue()
    assert "pip: fetch numpy" in text and "16.0/16.0 MB" in text
    assert "rootfs layer: cached" in text and "pack: failed" in text


def test_the_agents_preload_option_reaches_the_run_code_worker(tmp_path: Path) -> None:
    """``python3 -m ember.agent --preload ...``, as the VMM boots it: the worker has imported
    the modules before its first cell; one that cannot be imported does not stop it."""
    import socket
    import subprocess

    from ember.client import AgentClient

    path = str(tmp_path / "agent.sock")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    )
    argv = [sys.executable, "-m", "ember.agent", "--listen-unix", path,
            "--preload", "colorsys,ember_no_such_module"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env)

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return sock

    try:
        client = AgentClient(connect)
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        result = client.run_code(
            "import sys\nfrom ember.agent import preload\n"
            "('colorsys' in sys.modules, sorted(preload.failed), preload.modules())",
            timeout=60,
        )
        assert result.error is None
        assert (
            result.value == "(True, ['ember_no_such_module'], ['colorsys', 'ember_no_such_module'])"
        )
        client.shutdown()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
