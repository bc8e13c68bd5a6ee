"""The command line's one way to end: errors as one line, Ctrl-C / SIGTERM as one line saying what
was kept and how to resume, saves that a signal waits for, the output lock (package doc)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import typer
from rich.markup import escape

from .. import checks, output_lock
from ..progress import is_printing_process, print_error
from .app import console

RANK_ERROR_GRACE_S = 3.0  # how long a rank other than 0 leaves rank 0 to report an error first


def message(exc: BaseException) -> str:
    """One line for the user. Our own errors and the OS's carry a message meant for people; anything
    else is a bug in moepress or a library, said as such."""
    if isinstance(exc, (ValueError, OSError, RuntimeError, ImportError)):
        text = str(exc) or type(exc).__name__
        if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
            text = f"{text}: {exc.filename}"
        return text
    return (f"unexpected {type(exc).__name__}: {exc} (a bug: please report it; MOEPRESS_DEBUG=1 shows the "
            f"traceback)")


@contextlib.contextmanager
def user_errors(note=None):
    """Turn any exception into one `error:` line and exit 2; `note(exc)` may add to that line (e.g.
    what the run left). Under torchrun a rank other than 0 first waits `RANK_ERROR_GRACE_S`: rank 0
    meets the same error in that time as a rule, says it and ends, and torchrun then ends this rank
    silently; an error of this rank alone is printed after the wait, naming the rank."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the user gets one line, the debug switch the traceback
        if os.environ.get("MOEPRESS_DEBUG"):
            raise
        extra = note(exc) if note is not None else None
        text = message(exc) + (f"; {extra}" if extra else "")
        if not is_printing_process():
            time.sleep(RANK_ERROR_GRACE_S)
        print_error(text, prefix="[bold red]error:[/]" if is_printing_process() else
                    f"[bold red]error (rank {os.environ.get('RANK')}):[/]")
        raise typer.Exit(code=2) from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so every cleanup on the way out runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


_NOT_SET = object()


def _set_handler(signum: int, handler):
    """Install a signal handler (main thread only); returns the previous one, or `_NOT_SET`."""
    try:
        previous = signal.signal(signum, handler)
    except (ValueError, OSError):  # not the main thread
        return _NOT_SET
    return signal.SIG_DFL if previous is None else previous


@contextlib.contextmanager
def interrupts(describe):
    """Ctrl-C (SIGINT) and SIGTERM end the command with one line, `describe(verb)` (what was kept and
    how to resume), and exit code 130 / 143. Cleanups (the output lock, a half-written save) run
    first, as for any exception."""
    previous = _set_handler(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        if is_printing_process():
            console.print(escape(describe("terminated" if terminated else "interrupted")), soft_wrap=True,
                          highlight=False)
        raise typer.Exit(code=143 if terminated else 130) from None
    finally:
        if previous is not _NOT_SET:
            _set_handler(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred(what: str):
    """SIGINT/SIGTERM wait while `what` runs (a save stopped midway would lose finished layers, which
    it is moving into the checkpoint); one line says so. The command then ends normally."""
    told = []

    def defer(signum, frame):
        if not told and is_printing_process():
            console.print(escape(f"{signal.Signals(signum).name} received: finishing {what} first"),
                          soft_wrap=True, highlight=False)
        told.append(signum)

    previous = {signum: _set_handler(signum, defer) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not _NOT_SET:
                _set_handler(signum, handler)


def resume_command() -> str:
    """The command line that reruns this one (under torchrun: the torchrun line of one node)."""
    command = output_lock.command_line()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and command.startswith("moepress "):
        command = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)} -m {command}"
    return command


def lock_output(out: Path):
    """This run's lock on `out` (rank 0's under torchrun), or an error naming the run that holds it."""
    return output_lock.acquire(out, main_process=is_printing_process())


def check_output(out: Path, model, overwrite: bool) -> None:
    """`checks.check_output_dir`, but a live run on `out` is named first (its half-made output is not
    the problem to report)."""
    try:
        checks.check_output_dir(out, model, overwrite)
    except checks.ExportError:
        output_lock.refuse_if_busy(out)
        raise
