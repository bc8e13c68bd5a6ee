"""What long stages show on stderr: progress bars (docs/design.md#progress: layer i/N and ETA; `--quiet`
silences them), one-line errors and warnings, and no library noise.

Rich bars on stderr, so a command's printed results on stdout stay clean. Both bar helpers yield a
callback, or a no-op when disabled, so the code that does the work never tests for a bar.
The CLI runs every command inside `quiet_libraries()` and `one_line_warnings()`; under torchrun
only rank 0 prints (`is_printing_process`). No torch or transformers import here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

_console = Console(stderr=True)
_PACKAGE_DIR = Path(__file__).resolve().parent


def is_printing_process() -> bool:
    """True in a single process and on rank 0 of a `torchrun` launch (docs/design.md#torchrun: rank 0 is the
    only rank that prints). Read from torchrun's RANK variable, so it holds before the process group
    is joined and without importing torch."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


# set for a command unless the user set them: transformers and the hub read them when imported
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def print_error(message: str, prefix: str = "[bold red]error:[/]") -> None:
    """`prefix message` as one line on stderr (whitespace runs folded, the message never read as markup)."""
    _console.print(f"{prefix} {escape(' '.join(str(message).split()))}", soft_wrap=True, highlight=False)


@contextlib.contextmanager
def quiet_libraries():
    """transformers' progress bars ("Loading weights", "Writing model shards") and its logging below
    errors are off for the command (also when transformers is imported already, e.g. in tests)."""
    if os.environ.get("MOEPRESS_DEBUG"):
        yield
        return
    added = [key for key in _QUIET_ENV if key not in os.environ]
    os.environ.update({key: _QUIET_ENV[key] for key in added})
    tf_logging = sys.modules.get("transformers.utils.logging")
    saved = None
    if tf_logging is not None and "TRANSFORMERS_VERBOSITY" in added:
        saved = (tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled())
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
        if saved is not None:
            tf_logging.set_verbosity(saved[0])
            if saved[1]:
                tf_logging.enable_progress_bar()


@contextlib.contextmanager
def one_line_warnings():
    """Warnings raised by moepress print as one `warning:` line each, in its own voice (no file path,
    no source line); other libraries' Python warnings are not shown. MOEPRESS_DEBUG=1: all, as usual."""
    if os.environ.get("MOEPRESS_DEBUG"):
        yield
        return
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        yield


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning of moepress's own as one line in its voice (no file path, no source line)."""
    if not is_printing_process():
        return
    ours = category.__module__.split(".")[0] == "moepress"
    try:
        ours = ours or Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        pass
    if ours:
        print_error(str(message), prefix="[yellow]warning:[/]")


@contextlib.contextmanager
def layer_progress(quiet: bool, description: str = "compressing"):
    """Yields the pipeline's `progress(done, total, text)` callback (None when `quiet`).

    The bar is drawn at the first update, once the layer loop runs: an error in the arguments, the
    model or the calibration data is never preceded by an empty "0/? layers" bar."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                   TimeRemainingColumn(), console=_console, transient=False)
    task = None

    def update(done, total, text):
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total, description=f"{description} {text}")

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


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
