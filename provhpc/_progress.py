"""Progress of the long post-processing verbs, on a terminal only.

``track(items, description)`` yields ``items``; while progress is on (``enable(True)``,
which the CLI does when stderr is a terminal and ``PROVHPC_PROGRESS`` is not ``0``) and
``rich`` is installed (the ``progress`` extra), a transient bar on stderr follows them.
Off a terminal (a batch job's log, a pipe) nothing is drawn and nothing is imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["enable", "enabled", "track"]

T = TypeVar("T")
_on = False


def enable(on: bool) -> None:
    global _on
    _on = bool(on) and os.environ.get("PROVHPC_PROGRESS", "1") != "0"


def enabled() -> bool:
    return _on


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if not _on:
        yield from items
        return
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:  # the progress extra is not installed: no bar
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
