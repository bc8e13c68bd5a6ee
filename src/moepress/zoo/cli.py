"""``moepress zoo ...``: build the corpus, train reference models, list them."""

from __future__ import annotations

import json

import typer

zoo_app = typer.Typer(help="Built-in corpus, tokenizer and trained reference MoE models.", no_args_is_help=True)


def _echo(message: str) -> None:
    typer.echo(message)


@zoo_app.command("corpus")
def corpus_command(
    force: bool = typer.Option(False, "--force", help="Rebuild even if the corpus is cached."),
    export_texts: bool = typer.Option(False, "--export-texts", help="Also rewrite the shipped calib/held-out texts."),
) -> None:
    """Fetch the Debian packages, clean and split the corpus, train the tokenizer."""
    from .corpus import CorpusError, build_corpus, corpus_table
    from .tokenizer import build_tokenizer

    try:
        out = build_corpus(force=force, log=_echo)
    except CorpusError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(corpus_table(json.loads((out / "manifest.json").read_text())))
    typer.echo(f"corpus: {out}")
    typer.echo(f"tokenizer: {build_tokenizer(force=force)}")
    if export_texts:
        from .assets import export_builtin_texts

        typer.echo(json.dumps(export_builtin_texts(), indent=2))


@zoo_app.command("train")
def train_command(
    name: str = typer.Argument(..., help="Reference model: mixtral-ref, deepseek-ref, olmoe-ref, qwen3-ref or olmoe-wide (see `moepress zoo list`)."),
    force: bool = typer.Option(False, "--force", help="Retrain even if a trained model is cached."),
) -> None:
    """Train one reference model (cached; resumes a killed run)."""
    from .build import train_reference
    from .corpus import CorpusError
    from .recipes import RECIPES

    if name not in RECIPES:
        typer.secho(f"unknown reference model {name!r}; known: {', '.join(RECIPES)}", fg="red", err=True)
        raise typer.Exit(2)
    try:
        path = train_reference(name, force=force, log=_echo)
    except CorpusError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{name}: {path}")


@zoo_app.command("report")
def report_command(name: str = typer.Argument(..., help="Reference model to (re)measure.")) -> None:
    """Measure a trained reference model and store the result in its train_log.json."""
    from .build import finalize_reference

    report = finalize_reference(name, log=_echo)
    typer.echo(json.dumps({"summary": report["summary"], "perplexity": report["perplexity"]}, indent=2))


@zoo_app.command("build-all")
def build_all_command(force: bool = typer.Option(False, "--force", help="Retrain every model.")) -> None:
    """Corpus, tokenizer and every reference model (what `make zoo` runs)."""
    from .build import build_all
    from .corpus import CorpusError

    try:
        for path in build_all(force=force, log=_echo):
            typer.echo(str(path))
    except CorpusError as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(1) from None


@zoo_app.command("list")
def list_command() -> None:
    """The reference models, where they are and their recorded quality."""
    from rich.console import Console
    from rich.table import Table

    from . import reference_model_path
    from .recipes import RECIPES

    table = Table(title="moepress reference zoo")
    for column in ("name", "architecture", "status", "held-out ppl (mean)", "unigram ppl (mean)", "routing JSD (bits)"):
        table.add_column(column)
    for name, recipe in RECIPES.items():
        try:
            path = reference_model_path(name)
            status = str(path)
            log_path = path / "train_log.json"
            summary = json.loads(log_path.read_text()).get("evaluation", {}).get("summary", {}) if log_path.exists() else {}
        except FileNotFoundError:
            from .paths import models_dir

            partial = models_dir() / f"{name}.partial"
            status = f"training ({partial})" if partial.exists() else "not built (make zoo)"
            summary = {}
        table.add_row(name, recipe.config_class, status, str(summary.get("mean_ppl", "–")),
                      str(summary.get("mean_unigram_ppl", "–")), str(summary.get("mean_pairwise_jsd_bits", "–")))
    Console().print(table)


@zoo_app.command("path")
def path_command(name: str = typer.Argument("mixtral-ref", help="Reference model (default: the committed one).")) -> None:
    """Print a reference model's directory (e.g. `REF=$(moepress zoo path)` in a shell)."""
    from . import reference_model_path

    try:
        typer.echo(str(reference_model_path(name)))
    except (FileNotFoundError, ValueError) as err:  # not built yet / not a reference model: the loader says which
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None
