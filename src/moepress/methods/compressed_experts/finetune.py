"""A short fine-tuning loop for moepress results, made for Compressed Experts (ALGORITHMS.md §3.2).

The paper learns the compressed vectors with full supervised fine-tuning (TRL SFTTrainer, packed
text, AdamW, lr 2e-5, cosine schedule, warmup ratio 0.03, 2 epochs). Here, on packed plain text:

- `train="vectors"`: only the compressed-expert vectors learn (cheap; our addition, the paper
  always trains the whole model); `"all"`: everything, vectors included (the paper's recipe);
  `"model"`: everything *except* the vectors (the "top-k_main fine-tuned without vectors" baseline).
- `distill=True`: loss = KL(teacher || student) on the logits instead of next-token
  cross-entropy (our addition; needs no labels). The teacher is the same checkpoint with every
  Compressed Experts block set back to plain top-k (`k_main = k`): exactly the original model,
  because the routed experts are the stock ones. When the experts train too, the teacher is a
  frozen copy taken before the first step.

Two recipes (`RECIPES`, `--recipe`): `vectors` (the default above) and `paper` (the released
`run_sft.py`: whole model, lr 2e-5, 2 epochs, warmup 0.03, cosine). A run is a number of steps
(batches drawn with replacement) or of epochs (each a fresh permutation of the packed sequences);
AdamW with linear warmup then cosine decay to zero. Checkpoints
(`save_every`) hold the trainable tensors, the optimizer, the step, the loss history and every
RNG state, so `resume=True` continues bit-for-bit where a killed run stopped.

Loading a checkpoint, training and saving the result is `moepress.api.finetune_checkpoint`
(`moepress finetune` on the command line).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...modeling.moepress_compressed import CompressedExpertsBlock
from ...progress import step_progress

TRAIN_CHOICES = ("vectors", "all", "model")

#: Named presets; a field given explicitly always wins over its recipe's value.
RECIPES: dict[str, dict] = {
    # Our cheap default: only the compressed vectors learn, 200 steps at lr 1e-2.
    "vectors": {"train": "vectors", "steps": 200, "adam_beta2": 0.95},
    # ALGORITHMS.md §3.2, the released run_sft.py: TRL SFTTrainer on packed text, the whole model
    # with the vectors, lr 2e-5, cosine schedule, warmup ratio 0.03, 2 epochs, batch 8, and the HF
    # Trainer's AdamW defaults (betas 0.9/0.999, no weight decay, gradient norm clipped at 1).
    # Not reproduced: bf16 and gradient checkpointing (memory savers; we train in the model's dtype).
    "paper": {"train": "all", "lr": 2e-5, "epochs": 2.0, "adam_beta2": 0.999},
}


class FinetuneError(ValueError):
    """Bad fine-tuning input; the message says what to change."""


@dataclass
class FinetuneConfig:
    """Options of `finetune` (recorded in moepress.json under "finetune").

    `recipe` fills every option left at None: `vectors` (default) or `paper` (RECIPES). A run is
    `steps` optimizer steps of batches drawn with replacement, or `epochs` passes over the packed
    sequences in a fresh random order each epoch (the paper's recipe; steps = ceil(epochs·n / batch)).
    """

    recipe: str = field(default="vectors", metadata={"help": "vectors (vectors only, 200 steps, lr 1e-2) | "
                                                            "paper (whole model, lr 2e-5, 2 epochs, ALGORITHMS.md §3.2)"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (default: from the recipe)"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the data instead of --steps"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: the recipe's; "
                                                              "1e-2 vectors, 3e-4 otherwise)"})
    vectors_lr: float | None = field(default=None, metadata={
        "help": "peak lr of the compressed vectors alone (default: lr, as the paper; our addition for short runs)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps of linear warmup (paper: 0.03)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (never applied to vectors)"})
    adam_beta2: float | None = field(default=None, metadata={"help": "AdamW beta2 (default: the recipe's)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm (0 = off)"})
    train: str | None = field(default=None, metadata={"help": "vectors | all | model (all but the vectors); "
                                                               "default: the recipe's"})
    distill: bool = field(default=False, metadata={"help": "KL to the original top-k model's logits instead of CE"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    seed: int = field(default=0, metadata={"help": "seed of batch sampling and dropout"})

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise FinetuneError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.steps is not None and self.epochs is not None:
            raise FinetuneError("give --steps or --epochs, not both")
        length_given = self.steps is not None or self.epochs is not None
        for name, value in RECIPES[self.recipe].items():
            if name in ("steps", "epochs") and length_given:
                continue
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.train not in TRAIN_CHOICES:
            raise FinetuneError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, got {self.train!r}")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0) \
                or self.batch_size < 1:
            raise FinetuneError(f"need steps >= 1 (or epochs > 0) and batch size >= 1 "
                                f"(got steps {self.steps}, epochs {self.epochs}, batch {self.batch_size})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise FinetuneError(f"warmup ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.temperature <= 0:
            raise FinetuneError(f"temperature must be > 0, got {self.temperature}")
        if self.vectors_lr is not None and self.vectors_lr <= 0:
            raise FinetuneError(f"vectors lr must be > 0, got {self.vectors_lr}")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-2 if self.train == "vectors" else 3e-4)

    def total_steps(self, sequences: int) -> int:
        """Optimizer steps of this run on `sequences` packed sequences."""
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(self.epochs * sequences / self.batch_size))


@dataclass
class FinetuneResult:
    losses: list[float]
    steps: int
    seconds: float
    trainable_parameters: int


def compressed_blocks(model: nn.Module) -> list[nn.Module]:
    """The Compressed Experts blocks of `model`, recognised by their `kind` (so blocks loaded from a
    checkpoint's own auto_map code count too, though their class is another object)."""
    return [m for m in model.modules() if getattr(m, "kind", None) == CompressedExpertsBlock.kind]


def compressed_vectors(model: nn.Module) -> list[nn.Parameter]:
    """Every block's learned vectors (`ce_input`, `ce_intermediate`), taken from the blocks themselves."""
    return [p for block in compressed_blocks(model) for p in (block.ce_input, block.ce_intermediate)]


def select_trainable(model: nn.Module, train: str) -> dict[str, nn.Parameter]:
    """Set `requires_grad` by `train` and return `{name: parameter}` of what trains."""
    vectors = {id(p) for p in compressed_vectors(model)}
    if train == "vectors" and not vectors:
        raise FinetuneError(
            "this model has no compressed-expert vectors; compress it with --method compressed_experts "
            "first, or fine-tune everything with --train all"
        )
    chosen = {}
    for name, p in model.named_parameters():
        is_vector = id(p) in vectors
        keep = {"vectors": is_vector, "all": True, "model": not is_vector}[train]
        p.requires_grad_(keep)
        if keep:
            chosen[name] = p
    return chosen


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warmup over `ceil(warmup_ratio * total)` steps, then cosine decay to 0 (paper §3.1)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_teacher(model: nn.Module, train: str) -> nn.Module:
    """The original top-k model: a frozen copy with every compressed block set to `k_main = k`."""
    if not compressed_blocks(model):
        raise FinetuneError("--distill needs a Compressed Experts model (its teacher is the same model at top-k)")
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for block in compressed_blocks(teacher):
        block.k_main = block.top_k
    return teacher


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * KL(softmax(t/T) || softmax(s/T))`, mean over tokens (Hinton et al. 2015)."""
    t = temperature
    s = F.log_softmax(student_logits.float().flatten(0, -2) / t, dim=-1)
    p = F.log_softmax(teacher_logits.float().flatten(0, -2) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def _loss(model, teacher, ids: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
    if teacher is None:
        return model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        target = teacher(input_ids=ids).logits
    return distillation_loss(model(input_ids=ids).logits, target, config.temperature)


# ---------------------------------------------------------------------------------------- state
def _state(model, trainable, optimizer, step, losses, generator) -> dict:
    return {
        "step": step,
        "losses": losses,
        "trainable": {n: p.detach().clone() for n, p in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "batch_rng": generator.get_state(),
    }


def save_state(state_dir: Path, state: dict) -> Path:
    """Write `step-N.pt` atomically and point `latest` at it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"step-{state['step']:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    (state_dir / "latest").write_text(path.name + "\n")
    return path


def load_state(state_dir: Path) -> dict | None:
    latest = state_dir / "latest"
    if not latest.exists():
        return None
    return torch.load(state_dir / latest.read_text().strip(), weights_only=False)


def _restore(state, trainable, optimizer, generator) -> None:
    missing = sorted(set(trainable) ^ set(state["trainable"]))
    if missing:
        raise FinetuneError(f"checkpoint does not match this run's trainable parameters (e.g. {missing[:3]}); "
                            "resume with the same --train")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["batch_rng"])


# ----------------------------------------------------------------------------------------- loop
def _optimizer(model: nn.Module, trainable: dict[str, nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over three groups: decayed matrices, undecayed rest, and the compressed vectors (their
    own peak lr when `vectors_lr` is given). Each group keeps its peak lr under "peak_lr"."""
    vectors = {id(p) for p in compressed_vectors(model)}
    decay = [p for p in trainable.values() if id(p) not in vectors and p.dim() >= 2]
    rest = [p for p in trainable.values() if id(p) not in vectors and p.dim() < 2]
    vecs = [p for p in trainable.values() if id(p) in vectors]
    vector_lr = config.vectors_lr if config.vectors_lr is not None else config.peak_lr
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay, "peak_lr": config.peak_lr},
                          {"params": rest, "weight_decay": 0.0, "peak_lr": config.peak_lr},
                          {"params": vecs, "weight_decay": 0.0, "peak_lr": vector_lr}) if g["params"]]
    return torch.optim.AdamW(groups, lr=config.peak_lr, betas=(0.9, config.adam_beta2))


def batch_rows(step: int, sequences: int, config: FinetuneConfig, generator: torch.Generator) -> torch.Tensor:
    """The rows of step `step`: drawn with replacement (`steps` runs, from `generator`), or the
    step's slice of its epoch's permutation (`epochs` runs; a pure function of seed and step, so a
    resumed run sees the same order)."""
    if config.epochs is None:
        return torch.randint(0, sequences, (config.batch_size,), generator=generator)
    per_epoch = math.ceil(sequences / config.batch_size)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(sequences, generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
    return order[within * config.batch_size: (within + 1) * config.batch_size]


def finetune(model: nn.Module, input_ids: torch.Tensor, config: FinetuneConfig, *,
             state_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
             teacher: nn.Module | None = None) -> FinetuneResult:
    """Fine-tune `model` in place on packed sequences `input_ids [n, L]`.

    Args:
        state_dir: where periodic checkpoints go (needed for `save_every` and `resume`).
        resume: continue from the latest checkpoint in `state_dir` (model, optimizer, step, RNG).
        teacher: with `config.distill`, the model whose logits are the target (frozen, eval mode);
            default: the original top-k model rebuilt from `model`'s Compressed Experts blocks. Give it
            to distil a model without such blocks (e.g. a stock top-k/2 baseline) from the same teacher.
    Returns: the loss of every step (including steps done before a resume) and timing.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise FinetuneError(f"need packed sequences [n, seq_len], got shape {tuple(input_ids.shape)}")
    state_dir = Path(state_dir) if state_dir is not None else None
    total = config.total_steps(input_ids.shape[0])
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    trainable = select_trainable(model, config.train)
    if not config.distill:
        teacher = None
    elif teacher is None:
        teacher = make_teacher(model, config.train)
    else:
        teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    optimizer = _optimizer(model, trainable, config)
    step, losses = 0, []
    if resume:
        state = load_state(state_dir) if state_dir is not None else None
        if state is None:
            raise FinetuneError(f"--resume: no checkpoint found in {state_dir}")
        _restore(state, trainable, optimizer, generator)
        step, losses = state["step"], list(state["losses"])
    t0 = time.perf_counter()
    model.train()
    with step_progress(progress, total, step) as advance:
        while step < total:
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr_factor(step, total, config.warmup_ratio)
            rows = batch_rows(step, input_ids.shape[0], config, generator)
            batch = input_ids[rows].to(next(model.parameters()).device)  # the model's device (`--device`)
            loss = _loss(model, teacher, batch, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.grad_clip)
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            advance(losses[-1])
            if state_dir is not None and (step == total or (config.save_every and step % config.save_every == 0)):
                save_state(state_dir, _state(model, trainable, optimizer, step, losses, generator))
    model.eval()
    n_train = sum(p.numel() for p in trainable.values())
    return FinetuneResult(losses, step, time.perf_counter() - t0, n_train)


def plot_losses(losses: list[float], path: str | Path, title: str = "fine-tuning loss") -> Path:
    """Save the loss curve (raw and a 10-step running mean) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="step")
    w = min(10, len(losses))
    mean = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1]) for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), mean, lw=1.5, label=f"{w}-step mean")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title(title), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def finetune_record(config: FinetuneConfig, result: FinetuneResult, data: str) -> dict:
    return {"config": asdict(config), "data": data, "steps": result.steps, "seconds": round(result.seconds, 2),
            "trainable_parameters": result.trainable_parameters, "final_loss": result.losses[-1],
            "losses": [round(x, 5) for x in result.losses]}


__all__ = ["RECIPES", "FinetuneConfig", "FinetuneError", "FinetuneResult", "batch_rows", "finetune", "finetune_record", "lr_factor",
           "make_teacher", "plot_losses", "select_trainable"]
