"""Every test: ``ember run``/``ember exec`` run in-process unless a test says otherwise.

The run daemon (``ember.cli.runner``) would otherwise outlive the test session with its
spare sandboxes; ``tests/integration/test_runner.py`` tests it in a directory of its own
and stops it.
"""

from __future__ import annotations

import os

os.environ.setdefault("EMBER_RUNNER", "0")
