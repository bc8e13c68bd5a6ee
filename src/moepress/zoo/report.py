"""The quality card of a reference model: held-out perplexity vs unigram, routing specialisation."""

from __future__ import annotations

from pathlib import Path

import torch


def reference_report(path: str | Path, seq_len: int = 256, mc_per_domain: int = 32) -> dict:
    """Evaluate a trained reference model on the shipped held-out texts.

    Returns ``{"summary", "perplexity": {domain: {ppl, unigram_ppl, tokens}}, "routing",
    "next_chunk"}``. The unigram baseline is fitted on each evaluated text itself (an oracle
    no unigram model can beat), so ``ppl < unigram_ppl`` shows the model uses context.
    """
    from ..eval import evaluate
    from ..eval.perplexity import encode_text
    from ..loading import load_pretrained
    from . import builtin_domains, builtin_texts
    from .routing import domain_expert_usage, specialisation_report

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tokenizer = load_pretrained(str(path))
    domains = builtin_domains()
    report = evaluate(model, tokenizer, ppl=[f"heldout:{d}" for d in domains], tasks=["next_chunk", "domain_mc"],
                      seq_len=seq_len, mc_per_domain=mc_per_domain)
    perplexity = {}
    for d in domains:
        detail = report.details[f"ppl/heldout:{d}"]
        perplexity[d] = {"ppl": round(report.metrics[f"ppl/heldout:{d}"], 3),
                         "unigram_ppl": round(detail["unigram_ppl"], 3), "tokens": detail["tokens"]}
    streams = {d: encode_text(tokenizer, t) for d, t in builtin_texts().items()}
    routing = specialisation_report(domain_expert_usage(model, streams, seq_len=seq_len))
    summary = {
        "mean_ppl": round(sum(v["ppl"] for v in perplexity.values()) / len(perplexity), 2),
        "mean_unigram_ppl": round(sum(v["unigram_ppl"] for v in perplexity.values()) / len(perplexity), 2),
        "mean_pairwise_jsd_bits": round(routing["mean_pairwise_jsd_bits"], 4),
        "next_chunk_acc": round(report.metrics["next_chunk/acc"], 3),
        "domain_mc_acc": round(report.metrics["domain_mc/acc"], 3),
        "params_total": report.metrics.get("params/total"),
    }
    return {
        "summary": summary,
        "settings": report.settings,
        "perplexity": perplexity,
        "routing": routing,
        "next_chunk": report.details["next_chunk"],
        "domain_mc": report.details["domain_mc"],
    }
