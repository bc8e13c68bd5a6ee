"""One run per output directory (issue 20): a lock beside `--out`, taken before any work.

Two runs on the same `--out` would share its work directory (`.OUT.work`: one run's resume
record clears or adopts the other's layer shards) and race to rename their checkpoints into place.
So `compress` and `quantize` hold `.OUT.lock` (beside the output, like `.OUT.work` and the
`.OUT.partial-*` folder of a save) from their first step to the end of their save; a second run
is refused at once, with the first run's pid, host, start time and command line, which the lock
file holds as JSON.

The lock is `fcntl.flock` on that file: the kernel releases it when its process dies however it
dies (kill -9, OOM), so a lock file left by a dead run is stale by construction and the next run
simply takes it over. A run that ends (success, error, Ctrl-C, SIGTERM) removes the file. After
locking, the holder checks that the path still names the file it locked: a run that released and
removed it between another run's open and lock must not leave two holders.

Locks are re-entrant within a process (the CLI holds the output's lock and the API it calls takes
the same one). Under `torchrun` only rank 0 locks (it alone writes the output and the work
directory); the other ranks end with it. This module imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from .checks import InputError

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


class OutputBusyError(InputError):
    """Another live run holds the output's lock; the message names it (pid, host, command)."""


def lock_path(out: str | Path) -> Path:
    """`.OUT.lock` beside the output directory `out`."""
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.lock"


_COMMAND: list[str] | None = None  # the CLI command being run, when the CLI runs one


@contextlib.contextmanager
def running_command(argv: list[str]):
    """While a CLI command runs, `command_line()` is `argv` (also when the CLI is called from Python,
    where `sys.argv` is the caller's)."""
    global _COMMAND
    saved, _COMMAND = _COMMAND, list(argv)
    try:
        yield
    finally:
        _COMMAND = saved


def command_line() -> str:
    """This run's command line as the user would type it (`moepress compress ...`)."""
    if _COMMAND is not None:
        return shlex.join(_COMMAND)
    argv = list(sys.argv)
    head = Path(argv[0]).name if argv else "python"
    if head == "moepress" or argv[:1] and Path(argv[0]).parts[-2:] == ("moepress", "__main__.py"):
        return shlex.join(["moepress", *argv[1:]])
    return shlex.join([Path(sys.executable).name, *argv]) if argv and argv[0] else Path(sys.executable).name


class _Held:
    """The lock of one output directory held by this process (`count` handles on it)."""

    def __init__(self, path: Path, fd: int, created_dirs: list[Path]):
        self.path, self.fd, self.created_dirs, self.count = path, fd, created_dirs, 0


_HELD: dict[Path, _Held] = {}


class OutputLock:
    """A handle on an output's lock; `release()` (or leaving the `with` block) gives it up.
    The lock file goes when this process's last handle on it is released."""

    def __init__(self, path: Path | None):
        self.path = path  # None: a handle that holds nothing (a rank other than 0)
        self.released = path is None
        if path is not None:
            _HELD[path].count += 1

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        held = _HELD.get(self.path)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[self.path]
        try:
            if _same_file(held.fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(held.fd)  # releases the flock
        for folder in held.created_dirs:  # parents made for the lock alone, nothing else came
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a result dropped unsaved releases its output
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def acquire(out: str | Path, *, main_process: bool = True) -> OutputLock:
    """Lock output directory `out` for this run, or raise `OutputBusyError` naming the live holder.

    `main_process=False` (a data-parallel rank other than 0) returns a handle that holds nothing."""
    if not main_process:
        return OutputLock(None)
    path = lock_path(out)
    if path in _HELD:
        return OutputLock(path)
    created = _make_parents(path.parent)
    try:
        for _attempt in range(50):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                if not _try_lock(fd, path):
                    raise OutputBusyError(busy_message(out, _read_info(fd)))
                if not _same_file(fd, path):  # released and removed by its holder before we locked it
                    os.close(fd)
                    continue
                _write_info(fd)
            except BaseException:
                os.close(fd)
                raise
            _HELD[path] = _Held(path, fd, created)
            return OutputLock(path)
        raise OutputBusyError(f"output {Path(out).expanduser().resolve()}: its lock {path} keeps changing hands; "
                              f"another run is starting on it")
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def refuse_if_busy(out: str | Path) -> None:
    """Raise `OutputBusyError` when a live run holds `out`'s lock (creates nothing; for error paths,
    so a refused run names the running one rather than, say, its half-made output)."""
    path = lock_path(out)
    if path in _HELD or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        if not _try_lock(fd, path):
            raise OutputBusyError(busy_message(out, _read_info(fd)))
    finally:
        os.close(fd)  # also releases the probe's lock


def busy_message(out: str | Path, info: dict | None) -> str:
    """One line: which run holds `out` and what to do."""
    out = Path(out).expanduser().resolve()
    if info and info.get("pid"):
        who = f"pid {info['pid']} on host {info.get('host', '?')}"
        if info.get("started"):
            who += f", started {info['started']}"
        if info.get("command"):
            who += f": {info['command']}"
    else:
        who = f"its lock file {lock_path(out)} names no process yet"
    return f"output {out} is being written by another moepress run ({who}); wait for it to end or choose another --out"


def _try_lock(fd: int, path: Path) -> bool:
    """True when this process now holds the lock on `fd`; False when a live process does."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    # a filesystem without flock (some network mounts): judge by the recorded process
    info = _read_info(fd)
    if not info or info.get("host") != socket.gethostname():
        return not info
    return info.get("pid") == os.getpid() or not _alive(int(info.get("pid", 0)))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_info(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 1 << 16, 0)
        info = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _write_info(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command_line()}
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing
