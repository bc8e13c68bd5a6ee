"""Print the quality card of every built reference model.

Per model: held-out perplexity per domain (seq_len 256, stride 256, shipped held-out texts)
next to the oracle unigram perplexity of the same tokens, the routing specialisation
(mean pairwise Jensen-Shannon divergence of per-domain expert-usage histograms, averaged over
MoE layers; 0 = identical routing, 1 = disjoint), the local multiple-choice accuracies and the
training time. Uses the numbers recorded by `moepress zoo train` (``train_log.json``) unless
``--remeasure`` is given.

    python benchmarks/zoo_reference_report.py [--remeasure] [NAME ...]

`--quick`: the recorded card of the shipped `mixtral-ref` only (the models `make zoo` builds are
left out; `--remeasure` evaluates the whole held-out texts, ~1.5 min, so it is not part of it).
"""

from __future__ import annotations

import argparse
import json

from _common import print_provenance

from moepress.zoo import REFERENCE_MODELS, reference_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"reference models (default all: {', '.join(REFERENCE_MODELS)})")
    parser.add_argument("--remeasure", action="store_true", help="evaluate again instead of reading train_log.json")
    parser.add_argument("--quick", action="store_true", help="the recorded card of the shipped mixtral-ref (smoke run)")
    args = parser.parse_args()
    print_provenance()
    args.names = args.names or (["mixtral-ref"] if args.quick else list(REFERENCE_MODELS))  # names given are kept
    for name in args.names:
        try:
            path = reference_model_path(name)
        except FileNotFoundError as err:
            print(f"{name}: {err}")
            continue
        log = json.loads((path / "train_log.json").read_text())
        if args.remeasure or "evaluation" not in log:
            from moepress.zoo.report import reference_report

            log["evaluation"] = reference_report(path)
        ev = log["evaluation"]
        recipe = log["recipe"]
        print(f"== {name} ({recipe['config_class']}) at {path}")
        print(f"   params total {ev['summary']['params_total']:,}; {log['steps']} steps x "
              f"{recipe['batch_size']}x{recipe['seq_len']} tokens = {log['tokens_seen']:,} tokens; "
              f"train wall {log['train_wall_s'] / 60:.1f} min")
        print(f"   {'domain':12s} {'ppl':>9s} {'unigram':>9s} {'ratio':>6s} {'tokens':>7s}  JSD-to-mean(bits)")
        for domain, row in ev["perplexity"].items():
            jsd = ev["routing"]["domain_jsd_to_mean_bits"].get(domain, float("nan"))
            print(f"   {domain:12s} {row['ppl']:9.2f} {row['unigram_ppl']:9.2f} "
                  f"{row['ppl'] / row['unigram_ppl']:6.3f} {row['tokens']:7d}  {jsd:.4f}")
        print(f"   routing: mean pairwise JSD {ev['routing']['mean_pairwise_jsd_bits']:.4f} bits; per layer "
              + ", ".join(f"{k.split('.')[2]}:{v:.3f}" for k, v in ev["routing"]["per_layer_jsd_bits"].items()))
        print(f"   usage balance (normalised entropy, 1 = uniform): "
              + ", ".join(f"{v:.3f}" for v in ev["routing"]["usage_balance_entropy"].values()))
        print(f"   next_chunk acc {ev['summary']['next_chunk_acc']:.3f}, domain_mc acc "
              f"{ev['summary']['domain_mc_acc']:.3f} (chance 0.25, n={ev['next_chunk']['n']})")


if __name__ == "__main__":
    main()
