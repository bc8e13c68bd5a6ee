"""Layer-level diagnostics of merging vs pruning: relative error of each MoE layer's output on
held-out text of every domain, the compressed layer built from calibration inputs.

    .venv/bin/python benchmarks/merging_diagnostics.py [--model mixtral-ref] [--calib-domain linux]
        --variants "naee,mergemoe,mergemoe:target=routed,prune_refit:ridge=0.3"

A variant is a registry name with optional `:opt=value;opt=value` method options. Every layer is
compressed from the ORIGINAL model's inputs to that layer (no propagation, unlike `moepress
compress`), so each row isolates what the method does to one layer; printed: the mean over
layers of `‖block(x) − original(x)‖² / ‖original(x)‖²` on calibration tokens and on the held-out
tokens of each domain, and the geometric mean over domains. Cheap (seconds per variant on the
reference models): the way the merging options of methods/mergemoe and prune_refit were found
(README, "Merging vs pruning"). `--quick`: the default variants on a tiny random Mixtral, 4 x 64
calibration tokens, 1000 characters of each held-out text (a smoke run: plumbing, not quality).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import transformers
from _common import domain_calibration, print_provenance, quick, quick_model

from moepress.arch import moe_layer_views
from moepress.calib import LayerStatistics, build_calibration
from moepress.methods import LayerContext, build_method
from moepress.zoo import builtin_domains, builtin_text, reference_model_path


def moe_inputs(model, batches) -> dict[int, torch.Tensor]:
    """Flat inputs `[tokens, H]` of every MoE block on the given `[b, L]` id batches."""
    views = moe_layer_views(model)
    store = {v.layer_index: [] for v in views}
    hooks = [v.block.register_forward_hook(
        lambda mod, inp, out, i=v.layer_index: store[i].append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
        for v in views]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat(b) for i, b in store.items()}


def relative_error(block, view, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = view.forward(x).double()
        out = block(x.unsqueeze(0))
        out = (out[0] if isinstance(out, tuple) else out).reshape(ref.shape).double()
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key] = value
    return name, options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-ref")
    ap.add_argument("--calib-domain", default=None)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chars", type=int, default=12000, help="characters of each held-out text")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--variants", default="frequency,naee,mergemoe,mergemoe:target=routed,prune_refit")
    ap.add_argument("--quick", action="store_true", help="tiny random model, calibration and texts (smoke run)")
    args = ap.parse_args()
    print_provenance()
    quick(ap, args, samples=4, seq_len=64, chars=1000)
    warnings.simplefilter("ignore")
    if args.quick:
        args.model = "tiny random mixtral"
    path = quick_model() if args.quick else reference_model_path(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    calibration = build_calibration(tok, domain_calibration(args.calib_domain), samples=args.samples,
                                    seq_len=args.seq_len, seed=0)
    calib = moe_inputs(model, list(calibration.batches(8)))
    held = {}
    for domain in builtin_domains():
        ids = tok(builtin_text(f"heldout:{domain}")[: args.chars], add_special_tokens=False)["input_ids"]
        n = len(ids) // args.seq_len
        held[domain] = moe_inputs(model, [torch.tensor(ids[: n * args.seq_len]).view(n, args.seq_len)])
    views = moe_layer_views(model)
    print(f"model {args.model}, calibration {args.calib_domain or 'built-in multi-domain'}, ratio {args.ratio}: "
          f"relative squared error of the MoE-layer outputs, mean over {len(views)} layers")
    print(f"{'variant':>44} {'calib':>7} " + " ".join(f"{d[:8]:>8}" for d in held) + f" {'geo':>7}")
    for spec in args.variants.split(","):
        name, options = parse_variant(spec)
        t0 = time.perf_counter()
        errors = {d: [] for d in held}
        calib_errors = []
        for position, view in enumerate(views):
            x = calib[view.layer_index]
            ctx = LayerContext(view, LayerStatistics(view, list(x.split(2048))), position, len(views), model)
            block = build_method(name, ratio=args.ratio, **options).compress_layer(ctx).block
            if block is None:
                continue
            calib_errors.append(relative_error(block, view, x[:4096]))
            for domain in held:
                errors[domain].append(relative_error(block, view, held[domain][view.layer_index]))
        means = {d: sum(v) / len(v) for d, v in errors.items()}
        geo = math.exp(sum(math.log(v) for v in means.values()) / len(means))
        print(f"{spec:>44} {sum(calib_errors) / len(calib_errors):>7.4f} "
              + " ".join(f"{v:>8.4f}" for v in means.values()) + f" {geo:>7.4f}  ({time.perf_counter() - t0:.0f}s)",
              flush=True)


if __name__ == "__main__":
    main()
