"""``evaluate``: perplexity, built-in and lm-eval tasks, parameter counts, throughput."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

from ..devices import resolve_device
from ..loading import evaluation_dtype
from .local_tasks import ALIASES, LOCAL_TASKS, build_items, score_items
from .report import EvalReport


def _open(model, tokenizer, dtype="auto"):
    """`(model, tokenizer, name)` through the one loader; the tokenizer gets a pad token (EOS) for batching."""
    from ..loading import load_pretrained

    if isinstance(model, (str, Path)):
        name = str(model)
    else:
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    model, tokenizer = load_pretrained(model, tokenizer=tokenizer, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, name


def _resolve_text(entry: str) -> tuple[str, str]:
    """A ``--ppl`` entry: a text file, ``heldout:<domain>`` or a bare domain name -> (label, text)."""
    from ..resources import builtin_domains, builtin_text

    path = Path(entry).expanduser()
    if path.is_file():
        return path.name, path.read_text(errors="replace")
    domain = entry.split(":", 1)[1] if entry.startswith("heldout:") else entry
    if domain == "calib" or domain in builtin_domains():
        label = "calib" if domain == "calib" else f"heldout:{domain}"
        return label, builtin_text(label)
    raise ValueError(f"--ppl {entry!r} is neither a file nor a built-in text; built-in: calib, "
                     + ", ".join(f"heldout:{d}" for d in builtin_domains()))


def _split_names(values) -> list[str]:
    if isinstance(values, str):
        values = [values]
    return [part.strip() for value in values or () for part in str(value).split(",") if part.strip()]


def evaluate(model, tokenizer=None, ppl=(), tasks=(), seq_len: int = 256, stride: int | None = None,
             batch_size: int = 8, speed: bool = False, baseline=None, lm_eval_limit: int | float | None = None,
             mc_per_domain: int = 32, log=None, device: str | torch.device | None = "auto",
             dtype="auto", progress: bool | None = None) -> EvalReport:
    """Evaluate a causal LM the same way for every method.

    Args:
        model: a model object or a model directory / hub id (loaded with ``moepress.load``).
        tokenizer: tokenizer object or path; defaults to the model's directory.
        ppl: text files or built-in names (``"heldout:linux"``, ``"linux"``, ``"calib"``);
            perplexity over windows of ``seq_len`` tokens moved by ``stride`` (default ``seq_len``).
        tasks: ``next_chunk`` (``local_mc``) and ``domain_mc`` are scored directly; any other name
            runs through lm-eval (``moepress_next_chunk``, ``moepress_heldout_ppl`` built in).
        speed: also measure prefill and decode tokens/s.
        baseline: another model or path, evaluated with the same settings; the report then
            has retained % per metric.
        lm_eval_limit: passed to lm-eval as ``limit`` (items per task), for quick runs.
        mc_per_domain: items per domain of the local multiple-choice tasks.
        device: "auto" | "cpu" | "cuda" | "cuda:N" (`devices.resolve_device`): the model is moved
            there (a model object in place); None leaves it where it is.
        dtype: dtype a model path is run in: "auto" (default) = the dtype its weights are stored in,
            except that half-precision weights run in float32 on a CPU (`loading.evaluation_dtype`),
            or "float32" / "float16" / "bfloat16" (a model object is used as it is).
        progress: a bar per perplexity text and local task on stderr (windows / requests done);
            None = only when stderr is a terminal.

    Returns:
        EvalReport with flat ``metrics`` (``ppl/<label>``, ``<task>/acc``, ``params/total``, ...).
    """
    log = log or (lambda message: None)
    if progress is None:
        progress = sys.stderr.isatty()
    target = resolve_device(device) if device is not None else None  # checked before loading
    model, tokenizer, name = _open(model, tokenizer, evaluation_dtype(dtype, model, target))
    if target is not None:
        model.to(target)
    stride = stride or seq_len
    report = EvalReport(model=name, settings={"seq_len": seq_len, "stride": stride, "batch_size": batch_size})

    from ..arch import parameter_counts
    from .measure import throughput
    from .perplexity import perplexity

    for key, value in parameter_counts(model).items():
        if isinstance(value, (int, float)):
            report.metrics[f"params/{key}"] = value
        else:
            report.details.setdefault("params", {})[key] = value
    from ..arch import model_nonzero

    for key, value in (model_nonzero(model) or {}).items():  # zeroed weights (MoE-Pruner): what is stored
        report.metrics[f"params/{key}_nonzero"] = value

    for entry in _split_names(ppl):
        label, text = _resolve_text(entry)
        t0 = time.perf_counter()
        with _task_bar(progress, f"ppl/{label}", "windows") as advance:
            result = perplexity(model, tokenizer, text, seq_len=seq_len, stride=stride, batch_size=batch_size,
                                progress=advance)
        report.metrics[f"ppl/{label}"] = result.pop("ppl")
        report.details[f"ppl/{label}"] = {**result, "seconds": round(time.perf_counter() - t0, 2)}
        log(f"ppl/{label} = {report.metrics[f'ppl/{label}']:.3f}")

    task_names = _split_names(tasks)
    local = [t for t in task_names if ALIASES.get(t, t) in LOCAL_TASKS]
    remote = [t for t in task_names if t not in local]
    if local:
        from ..resources import builtin_texts

        texts = builtin_texts()
        for task in local:
            items = build_items(task, texts, per_domain=mc_per_domain)
            t0 = time.perf_counter()
            with _task_bar(progress, task, "requests") as advance:
                result = score_items(model, tokenizer, items, max_len=seq_len, batch_size=batch_size, progress=advance)
            report.metrics[f"{task}/acc"] = result["acc"]
            report.metrics[f"{task}/acc_norm"] = result["acc_norm"]
            report.details[task] = {"n": result["n"], "per_domain_acc": result["per_domain"], "chance": 0.25,
                                    "seconds": round(time.perf_counter() - t0, 2)}
            log(f"{task}/acc = {result['acc']:.3f}")
    if remote:
        from .lm_eval_bridge import run_lm_eval

        for task, metrics in run_lm_eval(model, tokenizer, remote, batch_size=batch_size, limit=lm_eval_limit).items():
            for metric, value in metrics.items():
                report.metrics[f"lm_eval:{task}/{metric}"] = value
        report.settings["lm_eval_limit"] = lm_eval_limit

    if speed:
        for key, value in throughput(model, len(tokenizer), prompt_len=seq_len).items():
            (report.metrics if key.endswith("tok_s") else report.details.setdefault("speed", {}))[
                f"speed/{key}" if key.endswith("tok_s") else key] = value

    if baseline is not None:
        report.baseline = evaluate(baseline, tokenizer=None if isinstance(baseline, (str, Path)) else tokenizer,
                                   ppl=ppl, tasks=tasks, seq_len=seq_len, stride=stride, batch_size=batch_size,
                                   speed=speed, lm_eval_limit=lm_eval_limit, mc_per_domain=mc_per_domain, log=log,
                                   device=device, dtype=dtype, progress=progress)
    return report


@contextlib.contextmanager
def _task_bar(enabled: bool, description: str, unit: str):
    """Yields ``advance(n, total)`` (``n`` more done of ``total``) for a bar ``description [bar]
    done/total unit, elapsed, ETA`` on the console of `moepress.progress`; a no-op when not ``enabled``.
    The bar is drawn at the first update (the work has started, its total is known)."""
    if not enabled:
        yield lambda n, total: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from ..progress import _console

    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=_console, transient=False)
    task = None

    def advance(n, total):
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, advance=n, total=total)

    try:
        yield advance
    finally:
        if task is not None:
            bar.stop()
