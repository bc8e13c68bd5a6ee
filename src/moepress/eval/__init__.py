"""Evaluation: perplexity, built-in multiple-choice tasks, lm-eval bridge, parameters, speed.

``evaluate(model, ppl=[...], tasks=[...])`` returns an ``EvalReport``; see ``harness.evaluate``.
"""

from __future__ import annotations

from .harness import evaluate
from .report import EvalReport

__all__ = ["evaluate", "EvalReport"]
