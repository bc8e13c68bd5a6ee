"""`moepress inspect`: per-layer expert usage on calibration data (table, JSON, heatmap)."""

from __future__ import annotations

from pathlib import Path

import torch

from .calib import build_calibration
from .devices import resolve_device
from .loading import evaluation_dtype, load_pretrained
from .methods import LayerContext, LayerResult, Method, MethodConfig
from .run.pipeline import compress_layers


class _RecordUsage(Method):
    """Leaves every layer unchanged and records its routing statistics (not registered)."""

    name = "inspect"
    summary = "record expert usage"
    needs = ("frequency", "routing_weight_sum")

    def compress_layer(self, ctx: LayerContext) -> LayerResult:
        freq = ctx.stats["frequency"]
        share = freq / freq.sum().clamp_min(1)
        entropy = float(-(share[share > 0] * share[share > 0].log()).sum() / torch.log(torch.tensor(len(share))))
        weight = ctx.stats["routing_weight_sum"]
        return LayerResult(None, {"usage": [round(float(s), 5) for s in share],
                                  "mean_weight": [round(float(w / max(f, 1)), 5) for w, f in zip(weight, freq)],
                                  "normalized_entropy": round(entropy, 4)})


def expert_usage(model, calib=None, samples: int = 32, seq_len: int = 256, tokenizer=None,
                 device: str | torch.device = "auto", dtype="auto") -> dict:
    """`{"layers": {index: {"usage": [E shares], "mean_weight": [...], "normalized_entropy": x}}}`.

    device: where each layer runs (`devices.resolve_device`; the model waits on the CPU)."""
    compute_device = resolve_device(device)
    model_obj, tok = load_pretrained(model, tokenizer=tokenizer, dtype=evaluation_dtype(dtype, model, compute_device))
    calibration = build_calibration(tok, calib, samples=samples, seq_len=seq_len)
    records = compress_layers(model_obj, _RecordUsage(MethodConfig()), calibration, device=compute_device)
    return {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
            "calibration": calibration.describe(), "layers": {str(k): v for k, v in records.items()}}


def usage_table(usage: dict):
    from rich.table import Table

    layers = usage["layers"]
    n = max(len(v["usage"]) for v in layers.values())
    table = Table(title="expert usage (% of routed slots) per MoE layer")
    table.add_column("layer")
    for j in range(n):
        table.add_column(f"E{j}", justify="right")
    table.add_column("norm. entropy", justify="right")
    for key, rec in layers.items():
        cells = [f"{100 * u:.1f}" for u in rec["usage"]] + [""] * (n - len(rec["usage"]))
        table.add_row(key, *cells, f"{rec['normalized_entropy']:.3f}")
    return table


def usage_heatmap(usage: dict, folder: str | Path) -> Path:
    """Save `expert_usage.png` (layers x experts) in `folder`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = usage["layers"]
    n = max(len(v["usage"]) for v in layers.values())
    grid = [v["usage"] + [0.0] * (n - len(v["usage"])) for v in layers.values()]
    fig, ax = plt.subplots(figsize=(max(4, n * 0.35), max(2.5, len(grid) * 0.4)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(grid)), list(layers))
    fig.colorbar(im, ax=ax, label="share of routed slots")
    ax.set_title("expert usage on calibration data")
    fig.tight_layout()
    path = folder / "expert_usage.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
