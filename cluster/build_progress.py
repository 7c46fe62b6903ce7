"""Progress reporting of a build: one rich task per slow step, on the caller's display or a transient one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class BuildSteps:
    """One rich task per build step, so the user sees which of the slow steps is running."""

    def __init__(self, progress: Progress, name: str) -> None:
        self._progress = progress
        self._name = name
        self._current: TaskID | None = None

    def start(self, description: str) -> None:
        self.done()
        self._current = self._progress.add_task(f"{self._name}: {description}", total=None)

    def done(self) -> None:
        if self._current is not None:
            self._progress.update(self._current, total=1, completed=1)
            self._current = None


@contextlib.contextmanager
def progress_or_new(progress: Progress | None) -> Iterator[Progress]:
    """Use the caller's progress display, or show a transient one on stderr for the build."""
    if progress is not None:
        yield progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    own = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with own:
        yield own
