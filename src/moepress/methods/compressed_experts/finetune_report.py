"""What a `finetune` run tells its user (`finetune.py`): its size before the first step, a warning
when the text is too small for the steps asked, and the loss plot with the held-out loss."""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

#: More passes over the text than this and the run warns that the text is too small.
MAX_EPOCHS_QUIET = 4.0


class FinetuneWarning(UserWarning):
    """A run that will work but probably not as meant (e.g. many epochs over a small text)."""


@dataclass
class FinetunePlan:
    """The size of a run, stated before its first step."""

    train_sequences: int
    validation_sequences: int
    seq_len: int
    steps: int
    batch_size: int
    generated: int = 0  # of the training sequences, sampled from the original model

    @property
    def epochs(self) -> float:
        return self.steps * self.batch_size / self.train_sequences

    def line(self) -> str:
        held = f" (+{self.validation_sequences} held out for validation)" if self.validation_sequences else \
            " (none held out: one sequence only, no validation loss)"
        sampled = f", {self.generated} of them sampled from the original model" if self.generated else ""
        return (f"finetune: {self.train_sequences} training sequences of {self.seq_len} tokens{sampled}{held}; "
                f"{self.steps} steps of batch {self.batch_size} = {self.epochs:.1f} epochs")

    def warning(self) -> str | None:
        """Why this run is probably not what was meant, or None."""
        if self.epochs <= MAX_EPOCHS_QUIET:
            return None
        fitting = max(1, math.floor(MAX_EPOCHS_QUIET * self.train_sequences / self.batch_size))
        return (f"the text gives only {self.train_sequences} training sequences of {self.seq_len} tokens: "
                f"{self.steps} steps of batch {self.batch_size} pass over it {self.epochs:.1f} times "
                f"(> {MAX_EPOCHS_QUIET:g} epochs), so the model learns this text rather than its domain. "
                f"Give more text (--data) or fewer steps ({fitting} steps = {MAX_EPOCHS_QUIET:g} epochs).")


def plot_losses(losses: list[float], path: str | Path, title: str = "fine-tuning loss",
                validation: list[tuple[int, float]] | None = None) -> Path:
    """Save the loss curve (raw and a 10-step running mean, and the held-out loss at the steps it
    was measured, `validation = [(steps done, loss)]`) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="step")
    w = min(10, len(losses))
    mean = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1]) for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), mean, lw=1.5, label=f"{w}-step mean")
    if validation:
        ax.plot([s for s, _ in validation], [v for _, v in validation], "o-", lw=1.5, ms=3, label="held out")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title(title), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def announce(plan: FinetunePlan, progress: bool, log) -> None:
    """The plan's line (when progress is shown) and its warning (always: `log`, else a FinetuneWarning)."""
    warning = plan.warning()
    if log is None and progress:
        log = _stderr_log
    if log is not None:
        log(plan.line())
        if warning:
            log(f"warning: {warning}")
    elif warning:
        warnings.warn(warning, FinetuneWarning, stacklevel=3)


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, done: int):
    """Yields `update(loss=None, val=None)`: one finished step when `loss` is given, a new "val" otherwise."""
    if not enabled:
        yield lambda loss=None, val=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("finetune"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("finetune", total=total, completed=done, loss="-", val="-")

        def update(loss=None, val=None):
            if loss is not None:
                bar.update(task, advance=1, loss=f"{loss:.4f}")
            if val is not None:
                bar.update(task, val=f"{val:.4f}")

        yield update
