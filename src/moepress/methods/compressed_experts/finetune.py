"""A short fine-tuning loop for moepress results, made for Compressed Experts
(docs/algorithms.md#compressed_experts-fine-tuning).

The paper learns the compressed vectors with full supervised fine-tuning (TRL SFTTrainer, packed
text, AdamW, lr 2e-5, cosine schedule, warmup ratio 0.03, 2 epochs). Here, on packed plain text:

- `train="vectors"`: only the compressed experts learn, their vectors and (with `aux_width`) their
  mini-experts (cheap; our addition, the paper always trains the whole model); `"all"`: everything, vectors included (the paper's recipe);
  `"model"`: everything *except* the vectors (the "top-k_main fine-tuned without vectors" baseline).
- `distill=True`: loss = KL(teacher || student) on the logits instead of next-token
  cross-entropy (our addition; needs no labels). The teacher is the same checkpoint with every
  Compressed Experts block set back to plain top-k (`k_main = k`): exactly the original model,
  because the routed experts are the stock ones. When the experts train too, the teacher is a
  frozen copy taken before the first step.

Three recipes (`RECIPES`, `--recipe`): `distill` (default: `train="vectors"` with `distill=True`),
`vectors` (the same on next-token loss) and `paper` (the released `run_sft.py`: whole model, lr
2e-5, 2 epochs, warmup 0.03, cosine). A run is a number of steps
(batches drawn with replacement) or of epochs (each a fresh permutation of the packed sequences);
AdamW with linear warmup then cosine decay to zero. Checkpoints
(`save_every`) hold the trainable tensors, the optimizer, the step, the loss history and every
RNG state, so `resume=True` continues bit-for-bit where a killed run stopped. An interrupted or
failed run also saves the last finished step; a run that finishes removes its checkpoints
(`keep_state=True` keeps them).

Before the first step the run states its size in one line (training sequences, steps, epochs)
and warns when the text is too small for the steps asked (more than `MAX_EPOCHS_QUIET` passes:
the vectors then learn that text, not its domain). The last `holdout` of the packed sequences (at
least one, at most `MAX_HOLDOUT`) never train: their loss is measured at the start, about ten
times during the run and at the end (the progress bar's "val", `FinetuneResult.validation`, the
loss plot).

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

from ...calib.generated import sample_sequences, start_token
from ...calib.sources import CalibrationError
from ...modeling.moepress_compressed import CompressedExpertsBlock
from .finetune_report import MAX_EPOCHS_QUIET, FinetunePlan, FinetuneWarning, announce, plot_losses, progress_bar
from .finetune_state import StateMismatch, load_state, remove_state, restore_state, save_state, state_snapshot

TRAIN_CHOICES = ("vectors", "all", "model")

#: Named presets; a field given explicitly always wins over its recipe's value.
RECIPES: dict[str, dict] = {
    # Our default (issue 23): the compressed experts' own parameters (vectors, and the mini-experts
    # when the model has them) learn the original top-k model's logits (KL), 200 steps; the
    # mini-experts at a lower lr (weight matrices, not scales). Measured on mixtral-ref calibrated
    # on Linux docs only: keeps or improves the fit out of domain, where `vectors` (next-token loss
    # on the same small text) undid it (benchmarks/ce_out_of_domain.py).
    # With `generated` (128 here) the training rows also hold sequences sampled from the teacher
    # (calib/generated.py). Out of domain, calibrated on Linux docs only (README "Compressed
    # Experts"): mixtral-ref fitted + distilled on this path recovers 81.3 % of the top-1 -> top-2
    # gap (72 % without sampled rows); qwen3-ref 89.6 % of the top-2 -> top-4 gap (83.6 % without;
    # measured there with the sampled sequences decoded into the text).
    "distill": {"train": "vectors", "steps": 200, "adam_beta2": 0.95, "distill": True, "lr": 3e-3, "aux_lr": 1e-3,
                "generated": 128},
    # The previous default: the same parameters on next-token cross-entropy, lr 1e-2.
    "vectors": {"train": "vectors", "steps": 200, "adam_beta2": 0.95, "distill": False, "aux_lr": 1e-3,
                "generated": 0},
    # docs/algorithms.md#compressed_experts-fine-tuning; the released run_sft.py: TRL SFTTrainer on
    # packed text, the whole model
    # with the vectors, lr 2e-5, cosine schedule, warmup ratio 0.03, 2 epochs, batch 8, and the HF
    # Trainer's AdamW defaults (betas 0.9/0.999, no weight decay, gradient norm clipped at 1).
    # Not reproduced: bf16 and gradient checkpointing (memory savers; we train in the model's dtype).
    "paper": {"train": "all", "lr": 2e-5, "epochs": 2.0, "adam_beta2": 0.999, "distill": False, "generated": 0},
}


#: At most this many held-out sequences (validation costs a forward pass over all of them).
MAX_HOLDOUT = 64


class FinetuneError(ValueError):
    """Bad fine-tuning input; the message says what to change."""


@dataclass
class FinetuneConfig:
    """Options of `finetune` (recorded in moepress.json under "finetune").

    `recipe` fills every option left at None: `vectors` (default) or `paper` (RECIPES). A run is
    `steps` optimizer steps of batches drawn with replacement, or `epochs` passes over the packed
    sequences in a fresh random order each epoch (the paper's recipe; steps = ceil(epochs·n / batch)).
    """

    recipe: str = field(default="distill", metadata={
        "help": "distill (compressed experts only, KL to the original top-k model, 200 steps) | vectors (the same "
                "on next-token loss, lr 1e-2) | paper (whole model, lr 2e-5, 2 epochs, docs/algorithms.md#compressed_experts-fine-tuning)"})
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
    aux_lr: float | None = field(default=None, metadata={
        "help": "peak lr of the auxiliary mini-experts (default: the recipe's; else the vectors' lr)"})
    distill: bool | None = field(default=None, metadata={
        "help": "KL to the original top-k model's logits instead of CE (default: the recipe's)"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    generated: int | None = field(default=None, metadata={
        "help": "training sequences sampled from the original top-k model and added to the text's (our addition: "
                "a one-domain text then no longer bends the model to its domain); default: the recipe's "
                "(distill 128, others 0)"})
    holdout: float = field(default=0.1, metadata={
        "help": f"fraction of the packed sequences held out for validation loss (the last ones; at least 1, "
                f"at most {MAX_HOLDOUT}; 0 = none)"})
    eval_every: int = field(default=0, metadata={"help": "validation loss every N steps (0 = about 10 times a run)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only on failure)"})
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
        if self.generated < 0:
            raise FinetuneError(f"generated must be >= 0 (sequences), got {self.generated}")
        if self.temperature <= 0:
            raise FinetuneError(f"temperature must be > 0, got {self.temperature}")
        if self.vectors_lr is not None and self.vectors_lr <= 0:
            raise FinetuneError(f"vectors lr must be > 0, got {self.vectors_lr}")
        if self.aux_lr is not None and self.aux_lr <= 0:
            raise FinetuneError(f"mini-expert lr must be > 0, got {self.aux_lr}")
        if not 0.0 <= self.holdout < 1.0 or self.eval_every < 0:
            raise FinetuneError(f"holdout must be in [0, 1) and eval_every >= 0 "
                                f"(got holdout {self.holdout}, eval_every {self.eval_every})")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-2 if self.train == "vectors" else 3e-4)

    def total_steps(self, sequences: int) -> int:
        """Optimizer steps of this run on `sequences` packed (training) sequences."""
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(self.epochs * sequences / self.batch_size))

    def held_out(self, sequences: int) -> int:
        """How many of `sequences` packed sequences are held out (the last ones): 0 with one sequence."""
        if self.holdout == 0 or sequences < 2:
            return 0
        return min(MAX_HOLDOUT, sequences - 1, max(1, round(self.holdout * sequences)))


@dataclass
class FinetuneResult:
    losses: list[float]
    steps: int
    seconds: float
    trainable_parameters: int
    validation: list[tuple[int, float]] = field(default_factory=list)  # (steps done, held-out loss)
    plan: FinetunePlan | None = None


def compressed_blocks(model: nn.Module) -> list[nn.Module]:
    """The Compressed Experts blocks of `model`, recognised by their `kind` (so blocks loaded from a
    checkpoint's own auto_map code count too, though their class is another object)."""
    return [m for m in model.modules() if getattr(m, "kind", None) == CompressedExpertsBlock.kind]


def compressed_vectors(model: nn.Module) -> list[nn.Parameter]:
    """Every block's learned vectors (`ce_input`, `ce_intermediate`), taken from the blocks themselves."""
    return [p for block in compressed_blocks(model) for p in (block.ce_input, block.ce_intermediate)]


def mini_experts(model: nn.Module) -> list[nn.Parameter]:
    """Every block's auxiliary mini-expert tensors (`aux_*`, present with `aux_width`)."""
    return [p for block in compressed_blocks(model) for name, p in block.named_parameters(recurse=False)
            if name.startswith("aux_")]


def select_trainable(model: nn.Module, train: str) -> dict[str, nn.Parameter]:
    """Set `requires_grad` by `train` and return `{name: parameter}` of what trains. `vectors` = the
    compressed experts' own parameters: the vectors and, when the model has them, the mini-experts."""
    vectors = {id(p) for p in compressed_vectors(model) + mini_experts(model)}
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


# ----------------------------------------------------------------------------------------- loop
def _optimizer(model: nn.Module, trainable: dict[str, nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over four groups: decayed matrices, undecayed rest, the compressed vectors (their own
    peak lr when `vectors_lr` is given) and the mini-experts (`aux_lr`, default the vectors' lr).
    Each group keeps its peak lr under "peak_lr"."""
    vectors = {id(p) for p in compressed_vectors(model)}
    minis = {id(p) for p in mini_experts(model)}
    other = [p for p in trainable.values() if id(p) not in vectors and id(p) not in minis]
    decay = [p for p in other if p.dim() >= 2]
    rest = [p for p in other if p.dim() < 2]
    vecs = [p for p in trainable.values() if id(p) in vectors]
    mini = [p for p in trainable.values() if id(p) in minis]
    vector_lr = config.vectors_lr if config.vectors_lr is not None else config.peak_lr
    mini_lr = config.aux_lr if config.aux_lr is not None else vector_lr
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay, "peak_lr": config.peak_lr},
                          {"params": rest, "weight_decay": 0.0, "peak_lr": config.peak_lr},
                          {"params": vecs, "weight_decay": 0.0, "peak_lr": vector_lr},
                          {"params": mini, "weight_decay": 0.0, "peak_lr": mini_lr}) if g["params"]]
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


@torch.no_grad()
def validation_loss(model, teacher, ids: torch.Tensor, config: FinetuneConfig) -> float:
    """Mean loss (the training loss: CE or distillation) over held-out sequences, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, ids.shape[0], config.batch_size):
        batch = ids[start: start + config.batch_size].to(device)
        total += float(_loss(model, teacher, batch, config)) * batch.shape[0]
    model.train(was_training)
    return total / ids.shape[0]


def finetune(model: nn.Module, input_ids: torch.Tensor, config: FinetuneConfig, *,
             state_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
             teacher: nn.Module | None = None, keep_state: bool = False, log=None) -> FinetuneResult:
    """Fine-tune `model` in place on packed sequences `input_ids [n, L]`; the last
    `config.held_out(n)` of them are held out for the validation loss.

    Args:
        state_dir: where checkpoints go (every `save_every` steps, and the last finished step when
            the run fails or is interrupted); needed for `resume`. Removed when the run finishes,
            unless `keep_state`.
        resume: continue from the latest checkpoint in `state_dir` (model, optimizer, step, RNG).
        teacher: with `config.distill`, the model whose logits are the target (frozen, eval mode);
            default: the original top-k model rebuilt from `model`'s Compressed Experts blocks. Give it
            to distil a model without such blocks (e.g. a stock top-k/2 baseline) from the same teacher.
        log: `log(message)` for the plan line and the small-text warning (default: stderr when
            `progress`; without progress the warning is a `FinetuneWarning`).
    Returns: the loss of every step and the validation losses (including those before a resume), timing.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise FinetuneError(f"need packed sequences [n, seq_len], got shape {tuple(input_ids.shape)}")
    state_dir = Path(state_dir) if state_dir is not None else None
    held = config.held_out(input_ids.shape[0])
    train_ids, val_ids = input_ids[: input_ids.shape[0] - held], input_ids[input_ids.shape[0] - held:]
    trainable = select_trainable(model, config.train)
    if not config.distill:
        teacher = None
    elif teacher is None:
        teacher = make_teacher(model, config.train)
    else:
        teacher = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if config.generated:  # sampled by the original model; validation stays on the given text
        sampler = teacher if teacher is not None else make_teacher(model, config.train)
        vocab = sampler.get_input_embeddings().num_embeddings
        try:
            start_token(None, sampler.config, vocab)
            start = None  # BOS (or EOS), as `moepress compress --calib-generated`
        except CalibrationError:  # neither: each sample continues the first token of a training sequence
            start = train_ids[torch.arange(config.generated) % train_ids.shape[0], 0].cpu()
        sampled = sample_sequences(sampler, None, config.generated, input_ids.shape[1], seed=config.seed,
                                   start=start)
        train_ids = torch.cat([train_ids, sampled.to(train_ids.device, train_ids.dtype)])
    total = config.total_steps(train_ids.shape[0])
    plan = FinetunePlan(train_ids.shape[0], held, input_ids.shape[1], total, config.batch_size, config.generated)
    announce(plan, progress, log)
    eval_every = config.eval_every or max(1, math.ceil(total / 10))
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _optimizer(model, trainable, config)
    step, losses, validation = 0, [], []
    if resume:
        state = load_state(state_dir) if state_dir is not None else None
        if state is None:
            raise FinetuneError(f"--resume: no checkpoint found in {state_dir}")
        try:
            restore_state(state, trainable, optimizer, generator)
        except StateMismatch as e:
            raise FinetuneError(str(e)) from None
        step, losses, validation = state["step"], list(state["losses"]), [tuple(v) for v in state.get("validation", [])]
    t0 = time.perf_counter()
    model.train()
    rng = (torch.get_rng_state(), generator.get_state())  # at the start of step `step`
    saved = step
    try:
        with progress_bar(progress, total, step) as update:
            if held and not validation:
                validation.append((0, validation_loss(model, teacher, val_ids, config)))
                update(val=validation[-1][1])
            while step < total:
                _train_step(model, teacher, trainable, optimizer, train_ids, step, total, config, generator, losses)
                step += 1
                rng = (torch.get_rng_state(), generator.get_state())
                update(loss=losses[-1])
                if held and (step % eval_every == 0 or step == total):
                    validation.append((step, validation_loss(model, teacher, val_ids, config)))
                    update(val=validation[-1][1])
                if state_dir is not None and config.save_every and step % config.save_every == 0:
                    save_state(state_dir, state_snapshot(trainable, optimizer, step, losses, validation, rng))
                    saved = step
    except BaseException:
        # A step that died halfway is redone on resume: the state is the last finished step's. (Only
        # an interrupt inside optimizer.step() could leave a half-updated tensor; it is rare and short.)
        if state_dir is not None and step > saved:
            save_state(state_dir, state_snapshot(trainable, optimizer, step, losses, validation, rng))
        raise
    model.eval()
    if keep_state and state_dir is not None and step > saved:
        save_state(state_dir, state_snapshot(trainable, optimizer, step, losses, validation, rng))
    elif not keep_state:
        remove_state(state_dir)
    n_train = sum(p.numel() for p in trainable.values())
    return FinetuneResult(losses, step, time.perf_counter() - t0, n_train, validation, plan)


def _train_step(model, teacher, trainable, optimizer, train_ids, step, total, config, generator, losses) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * lr_factor(step, total, config.warmup_ratio)
    rows = batch_rows(step, train_ids.shape[0], config, generator)
    batch = train_ids[rows].to(next(model.parameters()).device)  # the model's device (`--device`)
    loss = _loss(model, teacher, batch, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.grad_clip)
    optimizer.step()
    losses.append(float(loss.detach()))


def finetune_record(config: FinetuneConfig, result: FinetuneResult, data: str) -> dict:
    record = {"config": asdict(config), "data": data, "steps": result.steps, "seconds": round(result.seconds, 2),
              "trainable_parameters": result.trainable_parameters, "final_loss": result.losses[-1],
              "losses": [round(x, 5) for x in result.losses],
              "validation": [[s, round(v, 5)] for s, v in result.validation]}
    if result.plan is not None:
        plan = result.plan
        record.update(train_sequences=plan.train_sequences, validation_sequences=plan.validation_sequences,
                      epochs=round(plan.epochs, 3))
        if plan.warning():
            record["warning"] = plan.warning()
    return record


__all__ = ["MAX_EPOCHS_QUIET", "MAX_HOLDOUT", "RECIPES", "FinetuneConfig", "FinetuneError", "FinetunePlan",
           "FinetuneResult", "FinetuneWarning", "batch_rows", "finetune", "finetune_record", "lr_factor",
           "load_state", "make_teacher", "mini_experts", "plot_losses", "remove_state", "save_state", "select_trainable", "validation_loss"]
