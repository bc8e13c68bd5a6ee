"""The `moepress` command line (docs/design.md#commands). Thin: check the arguments, call the API, print.

First contact is fast: this package imports neither torch nor moepress's heavy modules at load
time (`moepress --help` answers at once), and each command checks its arguments with
`moepress.checks` before importing anything heavy and before any progress bar is drawn. Any error
ends the command with one line `error: ...` on stderr and exit code 2 (no traceback; set
MOEPRESS_DEBUG=1 to see one); so does a usage error (`--ratio abc`), instead of typer's panel.

While a command runs, library noise is off (transformers' progress bars and logging below errors)
and each warning moepress itself raises prints as one `warning: ...` line, without a source
location; other libraries' Python warnings are not shown (../progress.py; MOEPRESS_DEBUG=1 shows
everything). Under `torchrun` only rank 0 prints results, notices and warnings; another rank
prints an error only if rank 0 has not ended the run first (`errors.user_errors`).

`compress` and `quantize` hold a lock on their output (output_lock.py) and end on SIGINT / SIGTERM
with one line saying what was kept and the command that resumes, exit code 130 / 143.

Layout: `app.py` (the command group and shared helpers), `errors.py` (one-line errors, signals, the
output lock), `compress.py` (compress, quantize), `commands.py` (the others).
"""

from __future__ import annotations

import os

# importing the command modules registers their commands on `app`, in the order `--help` lists them
from . import compress as _compress  # noqa: F401
from . import commands as _commands  # noqa: F401
from .app import app

__all__ = ["app"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
