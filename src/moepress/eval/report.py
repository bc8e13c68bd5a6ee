"""The evaluation report: flat metrics, details, and retained % against a baseline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..record import strict_json

#: Metric-name fragments where smaller is better; every other metric is higher-is-better.
_LOWER_IS_BETTER = ("ppl", "perplexity", "bits_per_byte", "nll")


def lower_is_better(metric: str) -> bool:
    return any(part in metric for part in _LOWER_IS_BETTER)


def retained_percent(metric: str, value: float, baseline: float) -> float | None:
    """How much of the baseline's quality is kept, in %: ``b/v`` for lower-is-better, ``v/b`` otherwise."""
    if value is None or baseline is None:
        return None
    if lower_is_better(metric):
        return 100.0 * baseline / value if value else None
    return 100.0 * value / baseline if baseline else None


@dataclass
class EvalReport:
    """Result of ``moepress.eval.evaluate``.

    ``metrics`` is flat (``"ppl/heldout:linux"``, ``"next_chunk/acc"``, ``"params/total"``,
    ``"speed/decode_tok_s"``); ``details`` holds per-metric extras (token counts, unigram
    baseline, per-domain accuracies); ``settings`` the evaluation settings (seq_len, stride);
    ``baseline`` another report evaluated the same way, if any.
    """

    model: str
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    baseline: EvalReport | None = None

    @property
    def retained(self) -> dict[str, float]:
        if self.baseline is None:
            return {}
        out = {}
        for name, value in self.metrics.items():
            if name in self.baseline.metrics:
                kept = retained_percent(name, value, self.baseline.metrics[name])
                if kept is not None:
                    out[name] = kept
        return out

    def to_dict(self) -> dict:
        data = {"model": self.model, "settings": self.settings, "metrics": self.metrics, "details": self.details}
        if self.baseline is not None:
            data["baseline"] = self.baseline.to_dict()
            data["retained_percent"] = self.retained
        return data

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(strict_json(self.to_dict()))
        return path

    def table(self):
        """A ``rich.table.Table`` with one row per metric (and original / retained % columns), a
        geometric-mean perplexity row, and a caption saying what the arrows and retained % mean."""
        from rich.table import Table

        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        legend = "↓ lower is better, ↑ higher is better"
        if self.baseline is not None:
            legend += ("; retained % = how much of the original's quality is kept (original/compressed for ↓, "
                       "compressed/original for ↑); 100 = nothing lost")
        table = Table(title=f"moepress eval: {self.model}", caption=f"{legend}. {settings}")
        table.add_column("metric")
        table.add_column("compressed" if self.baseline is not None else "value", justify="right")
        if self.baseline is not None:
            table.add_column(f"original ({Path(self.baseline.model).name})", justify="right")
            table.add_column("retained %", justify="right")
        metrics = dict(self.metrics)
        base = dict(self.baseline.metrics) if self.baseline is not None else {}
        if sum(name.startswith("ppl/") for name in metrics) > 1:
            metrics["ppl/geo-mean"] = geometric_mean(v for k, v in self.metrics.items() if k.startswith("ppl/"))
            if base:
                base["ppl/geo-mean"] = geometric_mean(v for k, v in base.items() if k.startswith("ppl/"))
        for name, value in metrics.items():
            arrow = " ↓" if lower_is_better(name) else (" ↑" if not name.startswith(("params/", "speed/")) else "")
            row = [name + arrow, _fmt(value)]
            if self.baseline is not None:
                kept = retained_percent(name, value, base.get(name)) if not name.startswith("params/") else None
                row += [_fmt(base.get(name)), "–" if kept is None else f"{kept:.1f}"]
            table.add_row(*row)
        return table

    def __str__(self) -> str:
        import io

        from rich.console import Console

        console = Console(width=120, record=True, file=io.StringIO())
        console.print(self.table())
        return console.export_text()


def geometric_mean(values) -> float | None:
    """exp(mean(log v)) of the positive values (perplexities of several texts: no text dominates)."""
    import math

    logs = [math.log(v) for v in values if v is not None and v > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"
