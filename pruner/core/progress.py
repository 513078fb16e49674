"""Progress reporting, kept out of the algorithms: they call ``advance``; the CLI decides how it looks.

``advance(status=None)`` moves a task one step and optionally sets a short status text (e.g. the best
fitness of a search generation).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Protocol

Advance = Callable[..., None]


class Progress(Protocol):
    def task(self, description: str, total: int) -> ContextManager[Advance]: ...


class Silent:
    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        yield lambda status=None: None


class RichProgress:
    """A rich progress bar per task, on stderr, with elapsed and remaining time."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as Bar,
        )

        with Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=False,
        ) as bar:
            task = bar.add_task(description, total=total, status="")

            def advance(status: str | None = None) -> None:
                bar.update(task, advance=1, **({"status": status} if status is not None else {}))

            yield advance
