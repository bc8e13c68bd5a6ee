"""The `moepress` command group and what every command shares: usage errors as one line, quiet
libraries, one-line warnings (package doc), the help texts and argument helpers of several commands."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from .. import checks, output_lock
from ..progress import is_printing_process, one_line_warnings, print_error, quiet_libraries

console = Console(stderr=True)


class _MoepressGroup(TyperGroup):
    """The command group: a usage error is one `error:` line; every command runs with library noise
    silenced and warnings shown one line each (module doc)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = ["moepress", *(sys.argv[1:] if args is None else args)]
        try:
            with output_lock.running_command(argv):  # the command a resume line repeats
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # typer's own click: a usage error
            if type(exc).__name__ != "NoArgsIsHelpError":  # (that one has printed the help already)
                ctx = getattr(exc, "ctx", None)
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                print_error(exc.format_message() + hint)
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            console.print("Aborted!", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        with quiet_libraries(), one_line_warnings():
            return super().invoke(ctx)


app = typer.Typer(cls=_MoepressGroup, add_completion=False, no_args_is_help=True,
                  help="Compress Mixture-of-Experts LLMs and measure what it cost.")


STATS_CACHE_HELP = ("directory of the calibration-statistics cache, reused across runs (default: "
                    "$MOEPRESS_STATS_CACHE or the user cache's stats/; cap MOEPRESS_STATS_CACHE_GB, default 20)")


QUANTIZE_HELP = ("weight-only quantization of the routed experts after compression: none | int8 | fp8 "
                 "(torchao; one scale per output channel per expert; the checkpoint then needs "
                 "trust_remote_code=True with from_pretrained; implies --no-offload)")


DTYPE_HELP = ("dtype of the output / of evaluation: auto (the dtype the weights are stored in; a half-precision "
              "model is evaluated in float32 on a CPU) | float32 | float16 | bfloat16")


def parse_opts(opts: list[str] | None, recipe: Path | None) -> dict:
    import yaml

    out = {}
    if recipe is not None:
        if not Path(recipe).is_file():
            raise checks.InputError(f"--recipe {recipe} does not exist")
        try:
            data = yaml.safe_load(Path(recipe).read_text()) or {}
        except yaml.YAMLError as exc:
            raise checks.InputError(f"--recipe {recipe} is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise checks.InputError(f"--recipe {recipe}: expected a mapping of option: value")
        out.update(data)
    for item in opts or []:
        if "=" not in item:
            raise checks.InputError(f"--opt expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if re.fullmatch(r"\s*\d+:\d+\s*", value):  # YAML 1.1 would read "2:4" as the base-60 number 124
            out[key.strip().replace("-", "_")] = value.strip()
            continue
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = value
    return out


def log_notice(message: str) -> None:
    """A notice of the API (a resumed run, a cleared work directory): rank 0 prints it."""
    if is_printing_process():
        console.print(escape(str(message)), soft_wrap=True, highlight=False)


def check_propagate(propagate: str | None) -> None:
    if propagate is not None and propagate not in checks.PROPAGATIONS:
        raise checks.InputError(f"--propagate must be one of {', '.join(checks.PROPAGATIONS)}, got {propagate!r}")


def stats_cache_arg(stats_cache: Path | None, no_stats_cache: bool):
    """The `stats_cache=` of the API: False with --no-stats-cache, the given directory, or True (default place)."""
    return False if no_stats_cache else (stats_cache or True)


def check_quantize(scheme: str) -> None:
    if scheme not in checks.QUANTIZE_CHOICES:
        raise checks.InputError(f"--quantize must be one of {', '.join(checks.QUANTIZE_CHOICES)}; got {scheme!r}")
