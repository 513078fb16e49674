"""Progress reporting, kept out of the algorithms: they call ``advance``; the CLI decides how it looks."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Protocol


class Progress(Protocol):
    def task(self, description: str, total: int) -> ContextManager[Callable[[], None]]: ...


class Silent:
    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        yield lambda: None


class RichProgress:
    """A rich progress bar per task, on stderr, with elapsed and remaining time."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                 TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda: bar.advance(task)
