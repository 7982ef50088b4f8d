"""Modules a template's interpreters import before its snapshot (``--preload``).

Importing numpy in a fresh guest interpreter costs a minute of emulated page
faults here; imported once before the template's snapshot, it costs every
restored sandbox nothing. How the list travels, host to guest:

- ``ember template build NAME --preload MOD...`` (and the default template,
  which preloads numpy) puts it in :class:`ember.spec.SandboxSpec`
  ``preload``; the template's key covers it through the agent's argv;
- the VMM boots the agent as ``python3 -m ember.agent --preload numpy,pandas``
  (ember-init runs the argv given on the kernel command line);
- the agent sets :data:`ENV` (``EMBER_PRELOAD=numpy,pandas``) in its own
  environment, which every interpreter it starts inherits: the ``run_code``
  worker and the pool of pre-started interpreters each call
  :func:`import_from_env` before they say they are ready.

A module that fails to import does not stop an interpreter from starting (it
is recorded in :data:`failed`); the template build imports the list again
through ``run_code`` and fails with the module's own error, so a bad preload
is a build-time error, never a restore-time one. Stdlib only: this runs in
the guest.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

__all__ = ["ENV", "failed", "import_from_env", "modules", "parse"]

ENV = "EMBER_PRELOAD"
failed: dict[str, str] = {}


def parse(text: str) -> list[str]:
    """``"numpy, pandas,"`` -> ``["numpy", "pandas"]``."""
    return [name.strip() for name in text.split(",") if name.strip()]


def modules(environ: Mapping[str, str] | None = None) -> list[str]:
    """The modules to preload, from ``EMBER_PRELOAD``."""
    return parse((os.environ if environ is None else environ).get(ENV, ""))


def import_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Import every module in ``EMBER_PRELOAD``; return the names that imported."""
    done: list[str] = []
    for name in modules(environ):
        try:
            importlib.import_module(name)
        except BaseException as exc:  # SystemExit from a module's top level included
            if isinstance(exc, KeyboardInterrupt):
                raise
            failed[name] = f"{type(exc).__name__}: {exc}"
        else:
            done.append(name)
    return done
