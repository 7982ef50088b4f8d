"""Check that ``make allnoconfig`` honoured every line of Ember's config fragment.

``KCONFIG_ALLCONFIG`` is a request, not a command: Kconfig silently drops an
option whose dependencies are not met, or that was renamed in this kernel
version.  A dropped option costs a confusing boot failure minutes later (no
console, no initrd), so the build compares the fragment with the resulting
``.config`` and stops with the names of the options that did not stick.
"""

from __future__ import annotations

import re
from typing import Final

_SET: Final = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET: Final = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Options of a ``.config`` or fragment: name -> value, ``"n"`` for "is not set"."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if (match := _SET.match(line)) is not None:
            options[match.group(1)] = match.group(2)
        elif (match := _UNSET.match(line)) is not None:
            options[match.group(1)] = "n"
    return options


def _describe(value: str | None) -> str:
    return "not set" if value in (None, "n") else f"={value}"


def config_mismatches(fragment: str, dotconfig: str) -> list[str]:
    """One entry per fragment option the ``.config`` does not honour, in fragment order.

    ``=y`` must be ``=y``; ``=n`` must be unset (absent or "is not set", never
    ``y``/``m``); any other value (numbers, strings) must match exactly.
    """
    have = parse_config(dotconfig)
    problems: list[str] = []
    for name, want in parse_config(fragment).items():
        got = have.get(name)
        ok = got in (None, "n") if want == "n" else got == want
        if not ok:
            problems.append(f"{name} (wanted {_describe(want)}, got {_describe(got)})")
    return problems
