"""Build progress as ``rich`` progress bars, for people watching a terminal.

Template builds run several long steps (pip, the install into the guest's
tree, packing the image, booting, importing numpy in the emulated guest); each
becomes a row with a spinner while it runs and its duration once done, and a
download (pip's ``--progress-bar raw``) fills a real bar. It implements the
:class:`~ember.images.progress.Progress` interface, so the image builders need
not know which one they report to; logs that are not a terminal keep the plain
timestamped lines (:func:`for_terminal` chooses).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichBars

from ember.images.progress import Progress

__all__ = ["RichProgress", "for_terminal"]


class RichProgress(Progress):
    """One row per step; use as a context manager around the build."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console if console is not None else Console(stderr=True)
        super().__init__(sys.stderr, tty=True)  # its own output goes through the console
        self.bars = RichBars(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[size]}"),
            TimeElapsedColumn(),
            TextColumn("[dim]{task.fields[detail]}"),
            console=self.console,
        )
        self._tasks: list[TaskID] = []

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.bars.stop()

    def note(self, message: str) -> None:
        self.console.print(f"[dim]{message}", highlight=False)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        task = self.bars.add_task(name, total=None, detail="", size="")
        self._tasks.append(task)
        try:
            yield
        except BaseException:
            self.bars.update(task, description=f"[red]{name}: failed", detail="")
            self.bars.stop_task(task)
            raise
        else:
            row = next(t for t in self.bars.tasks if t.id == task)
            total = row.total or 1
            size = f"{total / 1e6:.1f}/{total / 1e6:.1f} MB" if row.fields.get("size") else ""
            self.bars.update(task, total=total, completed=total, detail="", size=size)
        finally:
            self._tasks.remove(task)

    def status(self, message: str, *, force: bool = False) -> None:
        if self._tasks:
            self.bars.update(self._tasks[-1], detail=message[:60])

    def transfer(self, done: int, total: int) -> None:
        """A download's progress in bytes (pip's raw progress lines)."""
        if self._tasks and total > 0:
            size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB"
            self.bars.update(self._tasks[-1], total=total, completed=min(done, total), size=size)

    def clear_status(self) -> None:
        pass


@contextlib.contextmanager
def for_terminal() -> Iterator[Progress]:
    """Rich bars when stderr is a terminal, else the plain line-per-step reporter."""
    if sys.stderr.isatty():
        with RichProgress() as progress:
            yield progress
    else:
        yield Progress()
