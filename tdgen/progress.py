"""Progress events: how stages report to whoever is watching (the CLI's Rich bars, batch JSON).

Stages call ``on_progress(Progress(...))``; they never import Rich. The callback must be cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Progress:
    stage: str
    """Short stage name: load, stage1, grid, mesh, unwrap, bake, refine, export."""
    step: int
    """Steps done so far in this stage (0 at its start)."""
    total: int
    """Steps this stage will take (1 for a stage without inner steps)."""
    loss: float | None = None
    """Latest loss, where the stage has one."""
    message: str = ""
    """Free text (e.g. the Gaussian count)."""


ProgressFn = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """A callback that ignores every event."""
