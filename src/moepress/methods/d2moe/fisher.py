"""Empirical Fisher of the routed experts and the Fisher-merged bases (D²-MoE §3.2, Eq. 4–5).

`F = (1/B) Σ_b (∂ℓ_b/∂W)²` element-wise, ℓ_b the next-token cross-entropy of calibration batch b
(`batch_size` sequences, B batches; empirical Fisher with the true labels, as in the released
`get_fisher.py`). The gradients are float32 (the compute dtype); their squares are accumulated in
float64 by default (`fisher_precision`): a float32 square is exact there and the sum of a few
hundred batches keeps ~1e-15 relative, so data-parallel ranks reproduce one process's Fisher
(float32 accumulators, as the released code, differ in the 7th digit with the summation order, and
a truncated SVD of the deltas amplified that to 2e-5 of the reconstructed experts in tests).

Layer by layer, so the model is never resident. The gradient of ℓ_b with respect to layer i's
expert weights is the vector-Jacobian product of layer i alone with `∂ℓ_b/∂h_{i+1}` (the gradient
arriving at its output), so the chain rule is walked one layer at a time:

1. forward walk over the ORIGINAL decoder layers: onload layer i, store its input hidden states
   (one safetensors file per layer in a scratch directory: the run's work directory when
   streaming), run every batch through it, release it. The model's own routers count the usage
   frequencies on the way (top-k membership, as the released `get_expert_freq.py`);
2. head: final norm + output embedding + the model's own loss function (shifted labels, mean over
   the batch's tokens) on the last layer's output gives `∂ℓ_b/∂h_L` for every batch;
3. backward walk from the last layer down to the first MoE layer: onload layer i, recompute it
   from its stored inputs with grad for the routed-expert weights and the input, back-propagate
   the arriving gradient, accumulate `(∂ℓ_b/∂W)²`, pass `∂ℓ_b/∂h_i` down, merge the layer's bases
   (Eq. 5 with Fisher × frequency weights) and release it. Dense layers in between (none for
   DeepSeek, whose dense layers come first) only pass the gradient down.

Peak memory: one decoder layer + the calibration hidden states + their gradients + one layer's
accumulators (its expert parameters, float64: 8 bytes per routed-expert parameter of the layer;
11.3 GB for a Mixtral-8x7B layer, half with `fisher_precision=float32`) + one batch's activations, independent of
depth. The merged bases go to the scratch directory too and are read back one layer at a time
(`FisherBases`): for Mixtral-8x7B they are 0.7 GB per layer in float32. Disk: the inputs of every
layer from the first MoE layer on (sequences × length × hidden values each), deleted as the
backward walk consumes them. Cost: per batch and layer two forwards and one backward (one forward
more than back-propagating through a resident model).

Data parallel: the ranks take contiguous runs of whole Fisher batches (`_rank_batches`), so every
ℓ_b is the loss of the batch one process would form, and the sums over batches (the accumulators,
frequencies and the batch count) are all-reduced before the merge. The scratch files are per rank.

Deviations: the model stays in eval mode (no dropout); the released code used train mode. ℓ is the
cross-entropy alone: the router load-balancing loss that `model(...).loss` adds when a config sets
`output_router_logits` is left out (a training regulariser, not the likelihood of Eq. 4).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ... import distributed
from ...arch import MoELayerView, decoder_layers, layer_view, moe_layer_indices
from ...distributed import all_reduce_sum
from ...ops.fisher_merge import fisher_merge
from ...run.store import InMemoryLayers
from ...run.walk import capture_layer_inputs, layer_output, run_layer, source_layers

PROJECTIONS = ("gate", "up", "down")
SCRATCH = "fisher"  # sub-directory of a streaming run's work directory


def calibration_ids(calibration, limit: int | None = None) -> torch.Tensor:
    """The `[n, L]` LongTensor of packed calibration sequences (`calibration.input_ids` or a tensor)."""
    ids = getattr(calibration, "input_ids", calibration)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("D²-MoE's Fisher needs calibration token ids as a [sequences, length] tensor")
    return ids[:limit] if limit else ids


def _expert_params(view: MoELayerView) -> list[nn.Parameter]:
    return [view.experts.gate_up_proj, view.experts.down_proj]


def _split(view: MoELayerView, fused: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split fused-layout tensors (like `gate_up_proj`, `down_proj`) into gate/up/down `[E, out, in]`."""
    shadow = SimpleNamespace(experts=SimpleNamespace(gate_up_proj=fused[0], down_proj=fused[1]))
    v = MoELayerView(shadow, view.spec, view.config, view.layer_index)
    return {"gate": v.gate_proj, "up": v.up_proj, "down": v.down_proj}


def _count_routing(views: list[MoELayerView], counts: dict[int, torch.Tensor]):
    """Forward hooks on the routers adding top-k membership counts into `counts[layer]`."""

    def hook_for(layer: int, num: int):
        def hook(_module, _inputs, output):
            index = output[-1]
            counts[layer] += torch.bincount(index.reshape(-1).cpu(), minlength=num).double()

        return hook

    return [v.router.register_forward_hook(hook_for(v.layer_index, v.num_experts)) for v in views]


class LayerFiles:
    """Named tensors per decoder layer, one safetensors file per layer in `directory`.

    Reads open the file for one tensor and close it again, so no more than that tensor is mapped."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.directory / f"layer-{index:05d}.safetensors"

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(self._path(index)))

    def read(self, index: int, name: str) -> torch.Tensor:
        with safe_open(self._path(index), "pt") as fh:
            return fh.get_tensor(name)

    def read_all(self, index: int) -> dict[str, torch.Tensor]:
        with safe_open(self._path(index), "pt") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}

    def remove(self, index: int) -> None:
        self._path(index).unlink(missing_ok=True)


class FisherBases(Mapping):
    """`{layer index: {"gate"|"up"|"down": base [out, in] float32, "frequency": [E] float64}}` read
    from disk one layer at a time (the last one read is cached). The files are deleted with this
    object."""

    def __init__(self, files: LayerFiles, layers: list[int], directory: Path):
        self._files, self._layers = files, sorted(layers)
        self._cached: tuple[int, dict] | None = None
        weakref.finalize(self, shutil.rmtree, str(directory), True)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._layers:
            raise KeyError(index)
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, self._files.read_all(index))
        return self._cached[1]

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def _scratch_directory(store) -> Path:
    """The directory for this rank's Fisher files: in the store's work directory when it has one.

    Every data-parallel rank stores the inputs of ITS calibration shard, and the work directory is
    shared by the ranks, so each rank has its own sub-directory (one shared one let the ranks
    overwrite each other's layer inputs: issue 25)."""
    work_dir = getattr(store, "work_dir", None)
    if work_dir is None:
        return Path(tempfile.mkdtemp(prefix="moepress-fisher-"))
    name = SCRATCH if not distributed.is_distributed() else f"{SCRATCH}-rank{distributed.rank():03d}"
    scratch = Path(work_dir) / name
    shutil.rmtree(scratch, ignore_errors=True)  # left by an interrupted run: never mixed in
    return scratch


def _final_norm(model: nn.Module) -> nn.Module:
    norm = getattr(getattr(model, "model", model), "norm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__} (expected model.model.norm)")
    return norm


def _forward_walk(model, store, batches, first_moe: int, inputs: LayerFiles):
    """Run the original layers over this rank's calibration `batches` (possibly none); store each
    layer's inputs from `first_moe` on and count routing. Returns (last layer outputs, layer kwargs,
    counts)."""
    hidden, kwargs = capture_layer_inputs(model, None, 0, batches=batches)
    counts: dict[int, torch.Tensor] = {}
    for i, layer in source_layers(store, range(len(decoder_layers(model)))):
        view = layer_view(model, i)
        if i >= first_moe:
            inputs.write(i, {f"batch-{b:06d}": h for b, h in enumerate(hidden)})
        if view is not None:
            counts[i] = torch.zeros(view.num_experts, dtype=torch.float64)
        hooks = _count_routing([view], counts) if view is not None else []
        try:
            hidden = run_layer(layer, i, hidden, kwargs)
        finally:
            for h in hooks:
                h.remove()
    return hidden, kwargs, counts


def _output_gradients(model, hidden: list[torch.Tensor], batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """`∂ℓ_b/∂h` at the last decoder layer's output, ℓ_b = the model's own causal-LM loss of batch b
    after the final norm and the output embedding (tied or not: it is the model's module)."""
    norm, head = _final_norm(model), model.get_output_embeddings()
    grads = []
    for h, ids in zip(hidden, batches):
        h = h.detach().requires_grad_(True)
        with torch.enable_grad():
            x = norm(h)  # a streamed run holds the head in the output dtype: compute in the states' dtype
            logits = torch.nn.functional.linear(x, head.weight.to(x.dtype),
                                                None if head.bias is None else head.bias.to(x.dtype))
            loss = model.loss_function(logits, ids.to(logits.device), model.config.vocab_size)
        grads.append(torch.autograd.grad(loss, h)[0])
    return grads


def _backward_layer(layer, index, inputs: LayerFiles, grads, kwargs, params, pass_down: bool,
                    precision: torch.dtype) -> list[torch.Tensor]:
    """Back-propagate every batch's output gradient through layer `index` (recomputed from its stored
    inputs); returns `Σ_b (∂ℓ_b/∂p)²` per parameter in `precision` and replaces `grads[b]` by
    `∂ℓ_b/∂input`."""
    acc = [torch.zeros(p.shape, dtype=precision, device=p.device) for p in params]
    device = params[0].device if params else next(layer.parameters()).device
    for b in range(len(grads)):
        x = inputs.read(index, f"batch-{b:06d}").to(device).requires_grad_(pass_down)
        with torch.enable_grad():
            y = layer(x, **kwargs[(index, x.shape[0])])
            y = layer_output(y)
        wrt = list(params) + ([x] if pass_down else [])
        out = torch.autograd.grad(y, wrt, grad_outputs=grads[b].to(y.device), allow_unused=True)
        for a, g in zip(acc, out):
            if g is not None:
                g = g.to(precision)  # a float32 square is exact in float64
                a.addcmul_(g, g)  # in place: no parameter-sized temporary for the square
        grads[b] = out[-1] if pass_down else None
        del x, y, out
    return acc


def _merged_bases(view: MoELayerView, acc: list[torch.Tensor], batches: torch.Tensor, freq) -> dict:
    """Eq. 5 with weights `F ⊙ freq`, F the batch mean of the (rank-summed) squared gradients."""
    fused = [all_reduce_sum(a) / batches.to(a.device) for a in acc]
    split = _split(view, fused)
    weights = {"gate": view.gate_proj, "up": view.up_proj, "down": view.down_proj}
    bases = {p: fisher_merge(weights[p].detach(), split[p], freq).float().cpu() for p in PROJECTIONS}
    return {**bases, "frequency": freq}


def _backward_walk(model, store, inputs, grads, kwargs, counts, batches, bases: LayerFiles,
                   precision: torch.dtype) -> None:
    first_moe = min(counts)
    for i, layer in source_layers(store, range(len(decoder_layers(model)) - 1, first_moe - 1, -1)):  # down
        view = layer_view(model, i)
        params = _expert_params(view) if view is not None else []
        try:
            for p in params:
                p.requires_grad_(True)
            acc = _backward_layer(layer, i, inputs, grads, kwargs, params, pass_down=i > first_moe,
                                  precision=precision)
        finally:
            for p in params:
                p.requires_grad_(False)
        if view is not None:
            bases.write(i, _merged_bases(view, acc, batches, counts[i]))
        del acc
        inputs.remove(i)


def _rank_batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """This rank's share of the calibration batches: batch b holds sequences `[b·B, (b+1)·B)` of all
    `ids`, and the ranks take contiguous runs of whole batches (`shard_slice` over the batches).

    ℓ_b is a mean over ITS batch, so Fisher depends on how sequences are grouped: dealing whole
    batches keeps the grouping of one process on any number of ranks, also when a rank's share of
    sequences is no multiple of the batch size (a rank may get no batch at all; it still takes part
    in every all-reduce)."""
    batches = list(ids.split(batch_size))
    return batches[distributed.shard_slice(len(batches))]


def fisher_bases(model: nn.Module, ids: torch.Tensor, batch_size: int = 1, store=None,
                 precision: torch.dtype = torch.float64) -> FisherBases:
    """Fisher × frequency merged bases of every MoE layer of the ORIGINAL model, layer by layer.

    Args:
        model: the model (not modified; grad flags are restored). Its decoder layers may live on
            the meta device when `store` onloads them.
        ids: `[n, L]` calibration token ids.
        batch_size: sequences per loss (the Fisher averages squared gradients of batch losses).
        precision: dtype of the squared-gradient accumulators (module docstring).
        store: a layer store with `load_original(i) -> layer` and `release(i)` (the pipeline's;
            default: the resident model). Its `work_dir`, if any, holds the scratch files.
    Returns:
        a `FisherBases` mapping `{layer_index: {"gate"|"up"|"down": base [out, in] float32 on CPU,
        "frequency": [E] float64}}`.
    """
    store = store if store is not None else InMemoryLayers(model)
    moe = moe_layer_indices(model)
    scratch = _scratch_directory(store)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    inputs = LayerFiles(scratch / "inputs")
    try:
        batches = _rank_batches(ids, batch_size)
        hidden, kwargs, counts = _forward_walk(model, store, batches, moe[0], inputs)
        counts = {i: all_reduce_sum(c).cpu() for i, c in counts.items()}
        total_batches = all_reduce_sum(torch.tensor(float(len(batches)), dtype=torch.float64)).cpu()
        grads = _output_gradients(model, hidden, batches)
        del hidden
        bases = LayerFiles(scratch / "bases")
        _backward_walk(model, store, inputs, grads, kwargs, counts, total_batches, bases, precision)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(inputs.directory, ignore_errors=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return FisherBases(bases, moe, scratch)
