"""The model card (`README.md`) written into every output directory, from its `moepress.json` record.

A checkpoint travels without the command that made it: the card says what it is (source, method and
options, dtype), what it holds (parameters stored and active per token, before and after), how to
load and serve it, and the record's key figures (calibration, per-layer fit errors, quantization,
fine-tuning, time). Everything in it is read from the record, so it never disagrees with it.
"""

from __future__ import annotations

import json
from statistics import mean

# per-layer record keys that are relative errors of a layer's fit (named by the methods that write them)
ERROR_KEYS = ("rel_error", "fit_rel_error", "calib_rel_error", "relative_activation_error")


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "–"


def _share(after, before) -> str:
    return f"{after / before:.1%}" if isinstance(after, int) and isinstance(before, int) and before else "–"


def _parameters(record: dict) -> list[str]:
    params = record.get("parameters") or {}
    before, after = params.get("before") or {}, params.get("after") or {}
    if not before and not after:
        return []
    rows = ["| parameters | source | this checkpoint | share |", "|---|---|---|---|"]
    for key, label in (("total", "stored, total"), ("routed_experts", "stored, routed experts"),
                       ("active_per_token", "active per token")):
        rows.append(f"| {label} | {_count(before.get(key))} | {_count(after.get(key))} | "
                    f"{_share(after.get(key), before.get(key))} |")
    experts = after.get("experts_per_layer")
    if experts and len(set(experts.values())) > 1:
        rows.append("")
        rows.append("Experts per layer: " + ", ".join(f"{k}: {v}" for k, v in experts.items()) + ".")
    return ["## What it holds", "", *rows, ""]


def _fit_errors(record: dict) -> list[str]:
    found = {}
    for layer in (record.get("layers") or {}).values():
        if not isinstance(layer, dict):
            continue
        for key in ERROR_KEYS:
            value = layer.get(key)
            if isinstance(value, dict):  # per projection (D²-MoE: gate / up / down): the layer's worst
                value = max((v for v in value.values() if isinstance(v, (int, float))), default=None)
            if isinstance(value, (int, float)):
                found.setdefault(key, []).append(float(value))
    return [f"- {key}, mean over {len(values)} layers: {mean(values):.4g} (worst {max(values):.4g})"
            for key, values in found.items()]


def _figures(record: dict) -> list[str]:
    lines = []
    calib = record.get("calibration")
    if isinstance(calib, dict):
        lines.append(f"- calibration: {calib.get('source')}, {calib.get('sequences')} sequences x "
                     f"{calib.get('seq_len')} tokens ({_count(calib.get('tokens'))} tokens), seed {calib.get('seed')}; "
                     f"propagation {record.get('propagation')}")
    lines += _fit_errors(record)
    quant = record.get("quantization")
    if isinstance(quant, dict):
        lines.append(f"- experts quantized: {quant.get('scheme')} ({quant.get('granularity')}), expert bytes "
                     f"{_count(quant.get('expert_bytes_before'))} -> {_count(quant.get('expert_bytes_after'))}")
    tune = record.get("finetune")
    if isinstance(tune, dict):
        shown = {k: tune[k] for k in ("data", "steps", "epochs", "final_loss", "val_loss") if k in tune}
        lines.append(f"- fine-tuned: {json.dumps(shown)}")
    if record.get("source_dtype_note"):
        lines.append(f"- dtype: {record['source_dtype_note']}")
    if isinstance(record.get("wall_seconds"), (int, float)):
        where = record.get("device") or "cpu"
        ranks = record.get("world_size") or 1
        lines.append(f"- made in {record['wall_seconds']:.1f} s on {where}" + (f", {ranks} ranks" if ranks > 1 else ""))
    return ["## Key figures (from moepress.json)", "", *lines, ""] if lines else []


def _usage(record: dict, name: str) -> list[str]:
    custom = record.get("export") == "custom"
    load = [
        "## Load and serve", "",
        "```python",
        "import moepress",
        f'model = moepress.load("{name}")             # float32 by default; dtype="auto" keeps the stored dtype',
    ]
    if custom:
        load += [
            "# without moepress installed (the modeling code ships in this folder):",
            "import transformers",
            f'model = transformers.AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
            "```", "",
            "Custom blocks: the layers moepress replaced are described in `config.json` (`moepress`) and run by",
            "`modeling_moepress.py`; with moepress installed in vLLM's environment, its plugin serves them:",
        ]
    else:
        load += [
            "# a stock checkpoint in the family's hub layout: any Transformers install loads it",
            "import transformers",
            f'model = transformers.AutoModelForCausalLM.from_pretrained("{name}")',
            "```", "",
            "A stock checkpoint: vLLM and other engines serve it as they serve the source model:",
        ]
    load += ["", "```bash", f"vllm serve {name}", "```", ""]
    return load


def _is_hub_id(source: str) -> bool:
    """`owner/name` with no path of this machine behind it (the hub's `base_model` field)."""
    from pathlib import Path

    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not Path(source).exists()


def model_card(record: dict, name: str) -> str:
    """The card's Markdown for the checkpoint folder `name` (as a user would pass it to `load`)."""
    method = record.get("method", "?")
    source = record.get("quantized_from") or record.get("source_model") or "an unnamed model object"
    options = record.get("config") or {}
    shown = ", ".join(f"{k}={v}" for k, v in options.items()) if options else "defaults"
    versions = record.get("versions") or {}
    hub_source = record.get("source_model")
    hub_source = hub_source if isinstance(hub_source, str) and _is_hub_id(hub_source) else None
    front = ["---", "library_name: transformers", f"tags: [moepress, {method}, mixture-of-experts]"]
    front += [f"base_model: {hub_source}"] if hub_source else []
    lines = [
        *front, "---", "",
        f"# {name}: {method} of {source}", "",
        f"Written by moepress {versions.get('moepress', '')}".rstrip() + f" with `--method {method}`"
        + (f" (options: {shown})" if method != "quantize" else "") + ".",
        "",
        f"- source: `{record.get('source_model') or source}`",
        f"- family: {record.get('family', '?')}; export: {record.get('export', '?')} checkpoint; "
        f"dtype: {record.get('dtype', '?')}",
        "", *_parameters(record), *_figures(record), *_usage(record, name),
        "The full record of the run, with every option and per-layer figure, is `moepress.json`.", "",
    ]
    return "\n".join(lines)
