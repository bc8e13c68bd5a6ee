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
        """A ``rich.table.Table`` with one row per metric (and baseline / retained columns)."""
        from rich.table import Table

        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        table = Table(title=f"moepress eval: {self.model}", caption=settings or None)
        table.add_column("metric")
        table.add_column("value", justify="right")
        if self.baseline is not None:
            table.add_column(f"baseline ({self.baseline.model})", justify="right")
            table.add_column("retained %", justify="right")
        retained = self.retained
        for name, value in self.metrics.items():
            arrow = " ↓" if lower_is_better(name) else ""
            row = [name + arrow, _fmt(value)]
            if self.baseline is not None:
                row += [_fmt(self.baseline.metrics.get(name)),
                        f"{retained[name]:.1f}" if name in retained else "–"]
            table.add_row(*row)
        return table

    def __str__(self) -> str:
        import io

        from rich.console import Console

        console = Console(width=120, record=True, file=io.StringIO())
        console.print(self.table())
        return console.export_text()


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"
