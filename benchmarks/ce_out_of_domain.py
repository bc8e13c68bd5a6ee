"""Compressed Experts out of domain: calibrate (and fine-tune) on ONE domain, measure all six.

    .venv/bin/python benchmarks/ce_out_of_domain.py [--model mixtral-ref] [--calib-domain linux]
        [--k-main 1] [--aux-width auto] [--steps 200] [--json out.json]

Each shipped held-out text of the zoo (moepress/zoo/assets/texts/heldout: code, foldoc, french,
handbook, linux, python_docs) is cut in two at a line break: the first half of `--calib-domain`'s
text is the only calibration and fine-tuning text (`all`: the first halves of all six), the second
halves of all six are the evaluation (windows of --seq-len tokens). The calibration domain's
column is in domain; the others are out of domain ("ood" = their geometric mean).
Rows: the original top-k; stock top-k_main and top-(k_main+1) (a stock model at a similar active
budget); the paper's vectors-only block fine-tuned by the default recipe; the fitted mini-experts
(`aux_width`, the defaults of `moepress methods compressed_experts`) before any training, after
the default fine-tune (`distill`) and after the previous default (`vectors`: next-token loss).
`--generated N` (default 128, the recipe's): N sequences sampled from the original model join the
calibration (`compress --calib-generated N`) and the fine-tuning rows (`FinetuneConfig.generated`);
0 = the calibration text alone.
"rec" = share of the top-k_main -> top-k gap recovered, (ppl_main - ppl) / (ppl_main - ppl_top-k),
on the ood geometric mean; active/stored = routed parameters per token / stored (the record's counts).
`--quick`: a tiny random Mixtral, width 2, 2 fine-tuning steps, 32-token windows: plumbing only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

from _common import heldout_quality, load_reference, print_provenance, quick, quick_model, stock_top

import moepress
from moepress.arch import parameter_counts
from moepress.calib.packing import build_calibration
from moepress.methods.compressed_experts.finetune import FinetuneConfig, finetune
from moepress.zoo import builtin_domains, builtin_text


def halves(domain: str) -> tuple[str, str]:
    text = builtin_text(f"heldout:{domain}")
    cut = text.rfind("\n", 0, len(text) // 2)
    return text[:cut], text[cut:]


def eval_windows(tokenizer, seq_len: int, per_domain: int):
    import torch

    out = {}
    for d in builtin_domains():
        ids = tokenizer(halves(d)[1], add_special_tokens=False)["input_ids"]
        n = min(len(ids) // seq_len, per_domain or len(ids))
        out[d] = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return out


def geo(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-ref")
    ap.add_argument("--calib-domain", default="linux", help="one held-out domain, or all")
    ap.add_argument("--k-main", type=int, default=None, help="default: top-k / 2")
    ap.add_argument("--aux-width", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="the mini-experts' width (default auto: the method's default, the expert width / 8)")
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps of each recipe")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--per-domain", type=int, default=0, help="evaluation windows per domain (0 = all)")
    ap.add_argument("--generated", type=int, default=128,
                    help="sequences sampled from the original model added to the calibration (compress "
                         "--calib-generated) and to the fine-tune (FinetuneConfig.generated); 0 = neither")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny random model and sizes (smoke run)")
    args = ap.parse_args()
    print_provenance()
    quick(ap, args, aux_width=2, steps=2, seq_len=32, samples=8, per_domain=2, generated=2)
    base, tok, path = load_reference(str(quick_model()) if args.quick else args.model)
    k = base.config.num_experts_per_tok
    k_main = args.k_main or max(1, k // 2)
    domains = builtin_domains()
    calib_domains = domains if args.calib_domain == "all" else [args.calib_domain]
    ood = [d for d in domains if d not in calib_domains] or domains
    folder = Path(tempfile.mkdtemp(prefix="moepress-ce-ood-"))
    calib = folder / "calib.txt"
    calib.write_text("\n".join(halves(d)[0] for d in calib_domains))
    held = eval_windows(tok, args.seq_len, args.per_domain)
    train_ids = build_calibration(tok, str(calib), samples=args.samples, seq_len=args.seq_len, seed=0).input_ids
    print(f"model {path}: top-{k} -> {k_main} main + {k - k_main} compressed; calibration and fine-tuning text: "
          f"first half of {', '.join(calib_domains)}{f' + {args.generated} sampled' if args.generated else ''} ({train_ids.shape[0]} x {args.seq_len} tokens); evaluation: "
          f"second halves, {sum(v.shape[0] for v in held.values())} windows; ood = {', '.join(ood)}", flush=True)

    def fitted(**options):
        result = moepress.compress(str(path), "compressed_experts", k_main=k_main, calib=str(calib),
                                   samples=args.samples, seq_len=args.seq_len, seed=0, offload=False,
                                   stats_cache=False, dtype="float32", calib_generated=args.generated, **options)
        return result.model.float().eval(), result.record["config"]

    def tuned(model, recipe):
        model = copy.deepcopy(model)
        finetune(model, train_ids, FinetuneConfig(recipe=recipe, steps=args.steps, generated=args.generated),
                 progress=False, log=lambda m: None)
        return model.eval()

    rows = {}

    def measure(name, model, variant=""):
        t = time.perf_counter()
        ppl = {d: heldout_quality(model.eval(), ids)[0] for d, ids in held.items()}
        counts = parameter_counts(model)
        rows[name] = {"ppl": ppl, "ood": geo(ppl[d] for d in ood), "all": geo(ppl.values()),
                      "active": counts["active_per_token"], "stored": counts["total"], "variant": variant}
        print(f"  measured {name} ({time.perf_counter() - t:.1f} s)", flush=True)

    measure(f"original top-{k}", base)
    measure(f"stock top-{k_main}", stock_top(base, k_main))
    if k_main + 1 < k:
        measure(f"stock top-{k_main + 1}", stock_top(base, k_main + 1))
    paper, _ = fitted(aux_width=None)  # the paper's block (vectors only)
    measure("paper vectors + finetune distill", tuned(paper, "distill"), "aux_width none (the paper's block)")
    fit, config = fitted(aux_width=args.aux_width)
    variant = f"aux_width {args.aux_width}, aux_fit {config['aux_fit']}, aux_ridge {config['aux_ridge']}"
    measure(f"fitted aux {args.aux_width}", fit, variant)
    measure(f"fitted aux {args.aux_width} + finetune distill", tuned(fit, "distill"), variant + ", recipe distill")
    measure(f"fitted aux {args.aux_width} + finetune vectors", tuned(fit, "vectors"), variant + ", recipe vectors")

    low, top = rows[f"stock top-{k_main}"]["ood"], rows[f"original top-{k}"]["ood"]
    short = {d: d[:6] for d in domains}
    print(f"\n{'variant':38s} " + " ".join(f"{short[d] + ('*' if d in calib_domains else ''):>7s}" for d in domains)
          + f" {'geo':>7s} {'ood':>7s} {'rec':>6s} {'active':>10s} {'stored':>11s}")
    for name, r in rows.items():
        rec = (low - r["ood"]) / (low - top) if low != top else float("nan")
        r["recovered_ood"] = rec
        print(f"{name:38s} " + " ".join(f"{r['ppl'][d]:7.2f}" for d in domains)
              + f" {r['all']:7.2f} {r['ood']:7.2f} {rec:6.1%} {r['active']:10,d} {r['stored']:11,d}")
    print("* = calibration domain (in domain); rec = share of the top-k_main -> top-k gap recovered on the ood "
          "geometric mean; active = parameters per token, stored = all parameters")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(path), "calib": calib_domains, "generated": args.generated,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
