"""Templates with packages, for real: a root file system layer built on the host, a template
whose interpreters preloaded the package, and sandboxes restored from it; numpy in the default.

The package is a small pure-Python wheel this test writes itself (byte-for-byte the same every
run, so its layer is a cache hit after the first run), so no package index is involved.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import templates
from ember.images import layers
from ember.images.packages import PackageSpec, layer_chain
from ember.images.rootfs import BaseInputs
from ember.sandbox import Sandbox
from ember.spec import SandboxSpec
from tests.integration.conftest import Images, ember

BUILD_TIMEOUT = 1800  # a boot, then numpy and the package imported by the emulated guest
PROBE = "ember_probe_pkg"
# One pre-started interpreter with a 32 MiB heap, not the default 2 with 64: the build's pool
# warm-up takes half as long, and the options are checked to reach the guest.
LEAN = ("--pool", "1", "--heap-mib", "32")
PROBE_SOURCE = "ANSWER = 42\n\ndef greet(name):\n    return f'hello {name} from the template'\n"


def make_wheel(directory: Path, name: str = PROBE, source: str = PROBE_SOURCE) -> Path:
    """A minimal valid wheel (PEP 427) holding one module, with fixed timestamps."""
    dist = f"{name}-1.0.dist-info"
    files = {
        f"{name}.py": source.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: ember-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return wheel


@pytest.fixture(scope="module")
def probe_template(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"test-pkg-{os.getpid()}"
    wheel = make_wheel(tmp_path_factory.mktemp("wheel"))
    r = ember("template", "build", name, "--pip", str(wheel), "--preload", PROBE, *LEAN,
              timeout=BUILD_TIMEOUT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    try:
        yield name
    finally:
        ember("template", "rm", name, timeout=60)


def test_the_package_imports_in_a_script_and_in_run_code(probe_template: str) -> None:
    with Sandbox(template=probe_template) as sb:
        preloaded = sb.run_code(f"import sys\n[m in sys.modules for m in ('numpy', '{PROBE}')]")
        assert preloaded.value == "[True, True]", preloaded  # imported before the snapshot
        pool = sb.ping()["pool"]
        assert (pool["size"], pool["heap_mib"]) == (1, 32), pool  # --pool 1 --heap-mib 32
        r = sb.run_code(f"import {PROBE}\n{PROBE}.ANSWER")
        assert r.error is None and r.value == "42", r
        script = f"import {PROBE}; print({PROBE}.greet('exec'))"
        r = sb.exec(["python3", "-c", script], timeout=600)
        assert (r.exit_code, r.stdout) == (0, b"hello exec from the template\n"), r
        # installed where the guest's python3 puts local packages, by the guest's own pip
        r = sb.exec(["ls", f"/{layers.GUEST_SITE}/{PROBE}-1.0.dist-info/INSTALLER"], timeout=120)
        assert r.exit_code == 0, r


def test_ember_run_uses_the_template(probe_template: str, tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text(f"import sys, {PROBE}\nprint({PROBE}.greet(sys.argv[1]))\nsys.exit(3)\n")
    r = ember("run", "--template", probe_template, str(script), "run", timeout=600)
    assert (r.returncode, r.stdout) == (3, "hello run from the template\n"), r.stderr[-2000:]


def test_building_it_again_is_a_cache_hit(probe_template: str, tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)  # the same bytes under another path: the same template
    lean = SandboxSpec(pool=1, heap_mib=32)
    spec = templates.package_spec_for(lean, PackageSpec(pip=(str(wheel),)), [PROBE])
    meta = templates.read_meta(templates.templates_root() / probe_template)
    if meta["inputs"] != templates.default_key(spec):
        # only where someone edits the agent while this runs (a shared work tree), never in CI
        pytest.skip("the guest agent's code changed since the template was built")
    r = ember("template", "build", probe_template, "--pip", str(wheel), "--preload", PROBE,
              *LEAN, timeout=300)  # fmt: skip
    assert r.returncode == 0 and "(cached)" in r.stdout, (r.stdout, r.stderr[-2000:])
    listing = ember("template", "ls", timeout=60).stdout
    line = next(line for line in listing.splitlines() if line.startswith(f"{probe_template} "))
    assert PROBE in line and "pool 1" in line and "heap 32 MiB" in line, line


def test_a_package_that_cannot_install_fails_in_one_line_and_leaves_nothing(
    images: Images, tmp_path: Path
) -> None:
    broken = tmp_path / "ember_broken_pkg-1.0-py3-none-any.whl"
    broken.write_bytes(b"this is not a zip file")
    r = ember("template", "build", f"test-broken-{os.getpid()}", "--pip", str(broken),
              timeout=600)  # fmt: skip
    assert r.returncode == 2
    # progress lines, then the error: one line, in pip's words
    error = r.stderr.splitlines()[-1]
    assert error.startswith("ember: error: pip") and "ERROR: Wheel 'ember-broken-pkg'" in error
    assert r.stderr.count("ember: error") == 1, r.stderr
    chain = layer_chain(BaseInputs.current().key(), PackageSpec(pip=(str(broken),)))
    final = layers.layer_dir(chain[-1])
    assert not final.exists() and not final.with_name(final.name + ".tmp").exists()


def test_numpy_in_the_default_template(images: Images) -> None:
    with Sandbox() as sb:
        r = sb.run_code("import sys\n'numpy' in sys.modules")
        assert r.value == "True", r  # preloaded in the template
        r = sb.run_code(
            "import numpy as np\na = np.arange(16.0).reshape(4, 4) + np.eye(4)\n"
            "round(float(np.linalg.det(a)), 6), np.__version__"
        )
        assert r.error is None and r.value is not None and r.value.startswith("("), r
        code = "import numpy; print(numpy.linalg.eig(numpy.diag([1.0, 2.0, 3.0]))[0].sum())"
        r = sb.exec(["python3", "-c", code], timeout=900)
        assert (r.exit_code, r.stdout) == (0, b"6.0\n"), r
