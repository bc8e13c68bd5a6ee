"""Progress bars for long stages (DESIGN.md §1: layer i/N and ETA; `--quiet` silences them).

Rich bars on stderr, so a command's printed results on stdout stay clean. Both helpers yield a
callback, or a no-op when disabled, so the code that does the work never tests for a bar.
"""

from __future__ import annotations

import contextlib

from rich.console import Console

_console = Console(stderr=True)


@contextlib.contextmanager
def layer_progress(quiet: bool, description: str = "compressing"):
    """Yields the pipeline's `progress(done, total, text)` callback (None when `quiet`)."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                  TimeRemainingColumn(), console=_console, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done, total, text):
            bar.update(task, completed=done, total=total, description=f"{description} {text}")

        yield update


@contextlib.contextmanager
def step_progress(enabled: bool, total: int, done: int = 0, description: str = "finetune"):
    """Yields `advance(loss)` for a training loop of `total` steps, `done` of them already taken."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn(description), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=_console) as bar:
        task = bar.add_task(description, total=total, completed=done, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.4f}")
