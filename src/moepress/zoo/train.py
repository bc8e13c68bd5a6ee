"""Training loop of the reference models: deterministic, resumable, CPU-friendly.

Batches mix the corpus domains (``p(domain) ~ tokens ** temperature``) with random windows
drawn from a seeded generator, so a rerun reproduces the same batches. Every
``checkpoint_every`` steps the model, optimiser and generator states go to
``<out>.partial/ckpt.pt``; a killed run resumes from there.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .paths import cache_dir
from .recipes import TrainRecipe, build_config
from .routing import capture_expert_counts


def token_streams(split: str, tokenizer, domains=None, force: bool = False) -> dict[str, np.ndarray]:
    """Each domain's split tokenised as one stream (documents joined by EOS), cached as .npy."""
    from .corpus import DOMAINS, TRAIN_DOMAINS, read_split
    from .paths import CORPUS_VERSION

    domains = domains or (TRAIN_DOMAINS if split != "heldout" else tuple(DOMAINS))
    # keyed by the tokenizer's vocabulary so a retrained tokenizer never reuses stale ids
    vocab_key = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:10]
    folder = cache_dir() / "tokens" / CORPUS_VERSION / vocab_key / split
    folder.mkdir(parents=True, exist_ok=True)
    streams = {}
    for domain in domains:
        path = folder / f"{domain}.npy"
        if path.exists() and not force:
            streams[domain] = np.load(path)
            continue
        texts = [doc["text"] for doc in read_split(domain, split)]
        encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        ids: list[int] = []
        for enc in encoded:
            ids.extend(enc.ids)
            ids.append(tokenizer.eos_token_id)
        streams[domain] = np.asarray(ids, dtype=np.uint16)
        np.save(path, streams[domain])
    return streams


def lr_at(step: int, recipe: TrainRecipe) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = min(1.0, (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup))
    floor = recipe.lr * recipe.min_lr_ratio
    return floor + 0.5 * (recipe.lr - floor) * (1 + math.cos(math.pi * progress))


class BatchSampler:
    """Seeded sampler of ``[batch, seq_len]`` windows from per-domain token streams."""

    def __init__(self, streams: dict[str, np.ndarray], recipe: TrainRecipe):
        self.domains = sorted(d for d, s in streams.items() if len(s) > recipe.seq_len + 1)
        self.streams = [streams[d] for d in self.domains]
        weights = np.array([len(s) ** recipe.domain_temperature for s in self.streams], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.recipe = recipe
        self.rng = np.random.default_rng(recipe.seed)

    def __call__(self) -> torch.Tensor:
        rows = []
        for _ in range(self.recipe.batch_size):
            stream = self.streams[self.rng.choice(len(self.streams), p=self.probs)]
            start = self.rng.integers(0, len(stream) - self.recipe.seq_len)
            rows.append(stream[start : start + self.recipe.seq_len].astype(np.int64))
        return torch.from_numpy(np.stack(rows))


def _eval_windows(streams: dict[str, np.ndarray], seq_len: int, per_domain: int) -> dict[str, torch.Tensor]:
    out = {}
    for domain, stream in streams.items():
        n = min(per_domain, len(stream) // seq_len)
        if n:
            out[domain] = torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)
    return out


@torch.no_grad()
def _eval_losses(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    losses = {d: float(model(input_ids=w, labels=w).loss) for d, w in windows.items()}
    model.train()
    return losses


def _optimizer(model, recipe: TrainRecipe):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "embed" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8)


def _update_routing_bias(model, counts: dict[str, torch.Tensor], rate: float) -> None:
    """DeepSeek-V3 auxiliary-loss-free balancing: raise the bias of under-used experts, lower over-used."""
    modules = dict(model.named_modules())
    for name, count in counts.items():
        bias = getattr(modules[name], "e_score_correction_bias", None)
        if bias is not None:
            bias += rate * torch.sign(count.mean() - count).to(bias.dtype)


def train_model(
    recipe: TrainRecipe,
    out: Path,
    train_streams: dict[str, np.ndarray],
    eval_streams: dict[str, np.ndarray] | None = None,
    tokenizer=None,
    checkpoint_every: int = 100,
    eval_every: int = 500,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
):
    """Train ``recipe`` from scratch into ``out`` (save_pretrained layout + train_log.json).

    Resumes from ``<out>.partial/ckpt.pt`` when present. ``stop_after=N`` checkpoints after step
    N and returns ``(None, None)`` without finishing (a deliberate interruption).
    Returns ``(model, train_log)``.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(recipe.seed)
    config = build_config(recipe)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm")
    model.train()
    optimizer = _optimizer(model, recipe)
    sampler = BatchSampler(train_streams, recipe)
    eval_windows = _eval_windows(eval_streams or {}, recipe.seq_len, per_domain=8)
    history: list[dict] = []
    start_step, elapsed_before = 0, 0.0

    ckpt_path = partial / "ckpt.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])
        start_step, history, elapsed_before = state["step"], state["history"], state["elapsed"]
        log(f"resumed {recipe.name} at step {start_step}")

    use_aux = recipe.balancing == "aux_loss"
    aux_coef = getattr(config, "router_aux_loss_coef", 0.0) if use_aux else 0.0
    t0 = time.time()
    ema = None
    for step in range(start_step, recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        batch = sampler()
        with capture_expert_counts(model) as counts:
            output = model(input_ids=batch, labels=batch, output_router_logits=use_aux)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if recipe.balancing == "bias":
            with torch.no_grad():
                _update_routing_bias(model, counts, recipe.bias_update_rate)
        aux = float(output.aux_loss.detach()) if use_aux and output.aux_loss is not None else 0.0
        lm_loss = float(output.loss.detach()) - aux_coef * aux
        ema = lm_loss if ema is None else 0.98 * ema + 0.02 * lm_loss
        done = step + 1
        if done % 50 == 0 or done == recipe.steps:
            elapsed = elapsed_before + time.time() - t0
            entry = {"step": done, "loss": round(lm_loss, 4), "loss_ema": round(ema, 4), "aux": round(aux, 4),
                     "lr": round(lr_at(step, recipe), 6), "elapsed_s": round(elapsed, 1)}
            if eval_windows and (done % eval_every == 0 or done == recipe.steps):
                entry["eval_loss"] = {d: round(v, 4) for d, v in _eval_losses(model, eval_windows).items()}
            history.append(entry)
            log(json.dumps(entry))
        stopping = stop_after is not None and done >= stop_after and done < recipe.steps
        if (done % checkpoint_every == 0 or stopping) and done < recipe.steps:
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                 "sampler_rng": sampler.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                 "history": history, "elapsed": elapsed_before + time.time() - t0},
                ckpt_path,
            )
        if stopping:
            return None, None

    wall = elapsed_before + time.time() - t0
    model.eval()
    model.config.output_router_logits = False
    final = out.with_name(out.name + ".final")
    if final.exists():
        shutil.rmtree(final)
    model.save_pretrained(final)
    if tokenizer is not None:
        tokenizer.save_pretrained(final)
    tokens = (recipe.steps - start_step) * recipe.batch_size * recipe.seq_len
    train_log = {
        "recipe": recipe.to_dict(),
        "steps": recipe.steps,
        "train_wall_s": round(wall, 1),
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "tokens_per_s_this_run": round(tokens / max(time.time() - t0, 1e-9), 1),
        "domain_probs": dict(zip(sampler.domains, [round(float(p), 4) for p in sampler.probs])),
        "train_tokens": {d: int(len(s)) for d, s in train_streams.items()},
        "history": history,
        "torch": torch.__version__,
    }
    (final / "train_log.json").write_text(json.dumps(train_log, indent=2))
    if out.exists():
        shutil.rmtree(out)
    final.rename(out)
    shutil.rmtree(partial, ignore_errors=True)
    return model, train_log
