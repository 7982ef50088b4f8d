"""``ember cluster``'s argv -> config, and the CLI's promise not to load Ray: no cluster, no KVM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ember.cli.cluster import config
from ember.cli.main import build_parser
from ember.cli.run import sandbox_options


def test_run_takes_ember_runs_options() -> None:
    args = build_parser().parse_args(
        ["cluster", "run", "--address", "10.0.0.1:6379", "--mem", "256", "--template", "sci",
         "job.py", "in.csv", "--verbose"]
    )  # fmt: skip
    assert config(args).address == "10.0.0.1:6379"
    assert (args.script, args.args) == (Path("job.py"), ["in.csv", "--verbose"])
    options = sandbox_options(args)
    assert (options["mem_mib"], options["template"], options["network"]) == (256, "sci", None)
    status = build_parser().parse_args(["cluster", "status", "--json"])
    assert (config(status).address, status.json) == (None, True)


def test_the_cli_does_not_import_ray() -> None:
    probe = (
        "import sys, ember.cli.main as m\n"
        "m.build_parser().parse_args(['cluster', 'status'])\n"
        "m.build_parser().parse_args(['cluster', 'run', 'x.py'])\n"
        "ray = [n for n in sys.modules if n == 'ray' or n.startswith(('ray.', 'ember.ray'))]\n"
        "print(sorted(ray))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, timeout=120)  # fmt: skip
    assert done.stdout.strip() == "[]"
