"""The `ember` command line: one module per subcommand."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # the run daemon's thin client imports this package, and not argparse
    from collections.abc import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number of at least ``minimum``: a bad one is the
    parser's usage error, not a traceback or a build that fails minutes later."""

    def parse(text: str) -> int:
        import argparse

        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argparse ``type`` for a duration: finite and more than 0 seconds (0 or less was
    passed on to the sandbox, which refused it only once it had started)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not is_positive_seconds(value):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def is_positive_seconds(value: float) -> bool:
    """What :func:`positive_seconds` accepts, for the run client, which imports no argparse."""
    import math

    return value > 0 and math.isfinite(value)
