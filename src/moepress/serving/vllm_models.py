"""vLLM models of moepress checkpoints (imported by vLLM only, through `vllm_plugin`).

`Moepress<Family>ForCausalLM` is the family's own vLLM model (vLLM's attention, linear layers,
FusedMoE, rotary, sampler) in which every decoder layer that `config.moepress["layers"]` lists gets
a MoE module that computes what `moepress.load` computes for that layer. Two paths:

- **vLLM's FusedMoE** (`FusedMoeBlock`) for the layers of kind `"experts"` (a stock MoE block with
  its own routed-expert count m: `--budget auto`, `--layers` with pruning) and `"remap"` (the N-way
  router + `expert_map [N] -> [0, M)` + M merged experts of MergeMoE, HC-SMoE, M-SMoE, ZipIt,
  average), unquantized, in the families whose vLLM MoE block is a router + one FusedMoE layer
  (+ a sigmoid-gated shared expert): Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE (`FUSED_FAMILIES`).
  The layer is vLLM's `GateLinear` router with the checkpoint's N rows and a FusedMoE layer
  (`FusedMoEFactory`) with m (or M) experts, so the experts run vLLM's fused kernel (on CPU:
  `cpu_fused_moe`). Routing is the family's, as transformers computes it: softmax over the N
  router logits -> top-k -> renormalised iff the family says so (Mixtral always; Qwen and OLMoE
  as `norm_topk_prob` says). For `"experts"` that is vLLM's own router (`renormalize` set per
  family and config); for `"remap"` a `custom_routing_function` (`FusedMoeBlock.route`) also maps
  the chosen original experts through `expert_map` and adds up the weights of choices that land on
  the same merged expert in the first such slot (the block's `A · mask_topK`); a repeated slot
  keeps the merged index with weight 0, so the kernel still gets k ids per token.
- **the opaque op** (`ServedMoepressBlock`) for every other layer: D²-MoE base + low-rank deltas,
  Compressed Experts (with or without mini-experts), MoE-I² low-rank experts, weight-only quantized
  experts (`"quant"`), and every kind in DeepSeek-V2/V3, PhiMoE and gpt-oss (their vLLM blocks
  route differently: grouped top-k, sparsemixer, biased top-k; not ported). The layer's MoE module
  is moepress's block of that kind (the very module transformers runs: `modeling/`), run as one
  opaque custom op (`moepress::served_block`), so vLLM's graph capture treats it as a leaf.
  `MOEPRESS_VLLM_OPAQUE=1` in the environment of the engine sends the fused-path layers this way
  too (the baseline `benchmarks/serve_speed.py` compares against: `METHOD@opaque`).

Weights: the checkpoint is in the family's hub layout (`modeling/moepress_layout.py`). A FusedMoE
layer's tensors go to vLLM's own loader: an `"experts"` layer's per-expert tensors are the stock
names (FusedMoE's weight loader puts expert j's gate/up/down into `w13`/`w2` by expert id and
shard id); a `"remap"` layer's fused `gate_up_proj [M, 2I, H]` / `down_proj [M, H, I]` are handed
to it as the per-expert tensors of merged expert j, and `expert_map` is a persistent buffer of the
block. The opaque blocks' tensors are mapped back to the block's own parameters with transformers'
conversion table (the same one that wrote them); everything else goes to vLLM's own loader.
"""

from __future__ import annotations

import copy
import importlib
import os
from types import SimpleNamespace

import torch
import transformers
from torch import nn

from ..modeling.modeling_moepress import install_moepress_blocks
from ..modeling.moepress_family import family_facts
from ..modeling.moepress_layout import to_hub_layout
from .vllm_plugin import VLLM_BASES

# Served blocks by layer name: the custom op finds its module here (vLLM smuggles FusedMoE layers
# into its op the same way, through the forward context).
_SERVED: dict[str, nn.Module] = {}
_HALF_OR_FULL = (torch.float32, torch.float16, torch.bfloat16)

# families whose vLLM MoE block is `gate` (GateLinear) + `experts` (one FusedMoE layer), plus a
# sigmoid-gated `shared_expert` for Qwen2-MoE, routed by softmax -> top-k (-> renormalise)
FUSED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FUSED_KINDS = ("experts", "remap")
OPAQUE_ENV = "MOEPRESS_VLLM_OPAQUE"  # "1": serve every listed layer through the opaque op


def fused_path(model_type: str, layer_cfg: dict) -> bool:
    """Whether a listed layer is served on vLLM's FusedMoE (`FusedMoeBlock`) rather than the opaque op."""
    if os.environ.get(OPAQUE_ENV, "") not in ("", "0"):
        return False
    return model_type in FUSED_FAMILIES and layer_cfg.get("kind") in FUSED_KINDS and not layer_cfg.get("quant")


def _renormalise(config) -> bool:
    """Whether the family divides the top-k weights by their sum (`Family.renormalise`)."""
    rule = family_facts(config.model_type).renormalise
    return rule == "always" or (rule == "norm_topk_prob" and bool(getattr(config, "norm_topk_prob", False)))


@torch.library.custom_op("moepress::served_block", mutates_args=())
def served_block(hidden_states: torch.Tensor, name: str) -> torch.Tensor:
    """The moepress block registered as `name` on flat tokens `[T, H]` -> `[T, H]` (as one sequence
    `[1, T, H]`: transformers' stock blocks, the per-layer expert counts, want three dimensions)."""
    out = _SERVED[name](hidden_states.unsqueeze(0))
    out = out[0] if isinstance(out, tuple) else out  # gpt-oss blocks also return router scores
    return out.reshape(hidden_states.shape)


@served_block.register_fake
def _served_block_shape(hidden_states: torch.Tensor, name: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


class ServedMoepressBlock(nn.Module):
    """A moepress block in a vLLM decoder layer (whatever arguments the layer passes besides the states)."""

    def __init__(self, block: nn.Module, name: str):
        super().__init__()
        self.block = block
        self.name = name
        _SERVED[name] = block

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1]).contiguous()
        return torch.ops.moepress.served_block(flat, self.name).reshape(shape)


class FusedMoeBlock(nn.Module):
    """A `"experts"` or `"remap"` layer on vLLM's own MoE layers (module doc): `gate` (GateLinear, N
    router rows), `experts` (FusedMoE over the m stored experts) and, for Qwen2-MoE, the stock vLLM
    block's `shared_expert` / `shared_expert_gate` (run by the FusedMoE layer, as vLLM does for the
    stock block). Attribute names are the stock block's, so the checkpoint's names load through
    vLLM's own loader.

    Args:
        stock: the family's vLLM MoE block this layer had (its shared expert is adopted).
        config: the model's hf config.
        hf_block: the layer's moepress/transformers block on meta (`_hf_blocks`): its shapes.
        kind: "experts" or "remap".
        prefix: the layer's MoE module name (`model.layers.{i}.{hub_block}`).
    """

    def __init__(self, stock: nn.Module, config, hf_block: nn.Module, kind: str, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear

        family = family_facts(config.model_type)
        router = hf_block._modules[family.router_attr]
        num_routed = int(router.weight.shape[0])  # N: the router's rows
        if kind == "remap":
            num_experts, intermediate = int(hf_block.num_merged), int(hf_block.intermediate_size)
        else:
            num_experts, intermediate = int(hf_block.experts.gate_up_proj.shape[0]), int(hf_block.experts.gate_up_proj.shape[1]) // 2
        self._model_type = config.model_type
        self.kind, self.hidden_size = kind, int(config.hidden_size)
        self.num_routed, self.num_experts = num_routed, num_experts
        self.gate = GateLinear(self.hidden_size, num_routed, prefix=f"{prefix}.gate")
        shared = None
        for name in family.shared_expert_attrs:  # Qwen2-MoE: the gate first, as in vLLM's block
            if name == family.shared_expert_gate:
                setattr(self, name, getattr(stock, name))
        for name in family.shared_expert_attrs:
            if name != family.shared_expert_gate:
                shared = getattr(stock, name, None)
                setattr(self, name, shared)
        if kind == "remap":
            self.register_buffer("expert_map", torch.arange(num_routed) % max(num_experts, 1), persistent=True)
        gate_name, up_name, down_name = family.hub_expert_names
        self.experts = FusedMoEFactory(
            num_experts=num_experts,
            top_k=int(config.num_experts_per_tok),
            hidden_size=self.hidden_size,
            intermediate_size=intermediate,
            renormalize=_renormalise(config),
            custom_routing_function=self.route if kind == "remap" else None,
            shared_experts=shared,
            prefix=f"{prefix}.experts",
            ckpt_names=(gate_name, down_name, up_name),
        )

    def route(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
              renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """FusedMoE's `custom_routing_function` for a remapped layer: the family's top-k over the N
        router logits, as transformers' router computes it, mapped to merged experts; the weights of
        the choices that name one merged expert are summed into the first of them (the other keeps
        the index with weight 0). Returns `(weights [T, k] float32, merged ids [T, k] int32)`."""
        probs = torch.softmax(gating_output, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, topk, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        merged = self.expert_map[index]  # [T, k]
        same = merged.unsqueeze(-1) == merged.unsqueeze(-2)  # [T, k, k]: slots i, j name one merged expert
        summed = (weights.unsqueeze(-2) * same).sum(dim=-1)  # as RemappedMoeBlock.routed: (weights * hit).sum
        earlier = torch.ones(topk, topk, dtype=torch.bool, device=same.device).tril(-1)
        repeated = (same & earlier).any(dim=-1)  # a slot whose merged expert an earlier slot names
        weights = summed.masked_fill(repeated, 0.0)
        return weights.to(torch.float32).contiguous(), merged.to(torch.int32).contiguous()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, self.hidden_size)
        router_logits, _ = self.gate(flat)
        return self.experts(hidden_states=flat, router_logits=router_logits).reshape(shape)

    def hub_weights(self, prefix: str, names: dict[str, torch.Tensor]):
        """This layer's checkpoint tensors (full names under `prefix.`) as vLLM's loader takes them:
        a remapped layer's fused merged experts (and a fused `experts.gate_up_proj`/`down_proj` of a
        moepress 0.1 checkpoint) split into per-expert `experts.{j}.<hub name>.weight`; the rest as is."""
        gate_name, up_name, down_name = family_facts(self._model_type).hub_expert_names
        for name, tensor in names.items():
            rest = name[len(prefix) + 1:]
            if rest in ("gate_up_proj", "experts.gate_up_proj"):
                half = tensor.shape[1] // 2
                for j in range(tensor.shape[0]):
                    yield f"{prefix}.experts.{j}.{gate_name}.weight", tensor[j, :half]
                    yield f"{prefix}.experts.{j}.{up_name}.weight", tensor[j, half:]
            elif rest in ("down_proj", "experts.down_proj"):
                for j in range(tensor.shape[0]):
                    yield f"{prefix}.experts.{j}.{down_name}.weight", tensor[j]
            else:
                yield name, tensor


def served_layer_paths(model: nn.Module) -> dict[str, str]:
    """`{layer index: path}` of a served model's decoder layers, path being `fused:<kind>:<vLLM experts
    kernel class>:<experts>/<router rows>` (`FusedMoeBlock`), `opaque:<moepress block class>`
    (`ServedMoepressBlock`) or `stock:<vLLM block class>` (the family's own block). `vllm_generate
    --describe` runs this inside the engine (`LLM.apply_model`)."""
    attr = family_facts(model.config.model_type).hub_block
    paths = {}
    for index, layer in enumerate(model.model.layers):
        module = getattr(layer, attr, None)
        if isinstance(module, FusedMoeBlock):
            method = module.experts.routed_experts.quant_method  # vLLM's choice of experts kernel
            kernel = getattr(getattr(method, "experts_cls", None), "__name__", type(method).__name__)
            paths[str(index)] = f"fused:{module.kind}:{kernel}:{module.num_experts}/{module.num_routed}"
        elif isinstance(module, ServedMoepressBlock):
            paths[str(index)] = f"opaque:{type(module.block).__name__}"
        elif module is not None:
            paths[str(index)] = f"stock:{type(module).__name__}"
    return paths


def _hf_blocks(config) -> dict[int, nn.Module]:
    """`{layer index: empty moepress block}` for every layer the checkpoint lists, built by the shipped
    modeling code on a meta-device copy of the stock transformers model (nothing is allocated)."""
    config = copy.deepcopy(config)  # transformers' init writes implementation fields into its config
    family = family_facts(config.model_type)
    with torch.device("meta"):
        model = getattr(transformers, family.causal_lm_class)(config)
        install_moepress_blocks(model, config)
    return {int(i): model.model.layers[int(i)].mlp for i in config.moepress.get("layers", {})}


def _drop_fused_moe(vllm_config, module: nn.Module) -> None:
    """Unregister the FusedMoE layers of a replaced module from vLLM's forward context (their op finds
    layers by name, or by position among all MoE layers: a stale entry would shift the others)."""
    compilation = vllm_config.compilation_config
    for sub in module.modules():
        name = getattr(sub, "layer_name", None)
        if isinstance(name, str) and name in compilation.static_forward_context:
            del compilation.static_forward_context[name]
            all_moe_layers = getattr(compilation, "static_all_moe_layers", None)  # vLLM >= 0.1x
            if all_moe_layers is not None and name in all_moe_layers:
                all_moe_layers.remove(name)


def _order_moe_layers(vllm_config, model: nn.Module) -> None:
    """Put the model's FusedMoE layers in vLLM's list of MoE layers in model order (a FusedMoE
    layer built after the model, `FusedMoeBlock`, registers itself at the end; the fused op may
    find a layer by its position in that list)."""
    compilation = vllm_config.compilation_config
    all_moe_layers = getattr(compilation, "static_all_moe_layers", None)
    if all_moe_layers is None:
        return
    ours = list(dict.fromkeys(m.layer_name for m in model.modules()
                              if isinstance(getattr(m, "layer_name", None), str) and m.layer_name in all_moe_layers))
    positions = [i for i, name in enumerate(all_moe_layers) if name in set(ours)]
    for position, name in zip(positions, ours):  # other models' layers keep their places
        all_moe_layers[position] = name


def _place(block: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Allocate the meta block on `device`; half/full-precision tensors in the served dtype (integer
    and fp8 weights of quantized experts keep theirs; DeepSeek-V3's correction bias stays float32)."""
    block.to_empty(device=device)
    for module in block.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or tensor.dtype not in _HALF_OR_FULL or name == "e_score_correction_bias":
                continue
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(tensor.to(dtype), requires_grad=False)
            else:
                module._buffers[name] = tensor.to(dtype)
    return block


def _load_block(block: nn.Module, config, index: int, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Copy a replaced layer's checkpoint tensors (hub names) into `block`; returns the names of
    `block`'s parameters that were filled (relative to the block)."""
    memory_prefix = f"model.layers.{index}.mlp."
    layout_owner = SimpleNamespace(config=config)
    filled = set()
    state = block.state_dict(keep_vars=True)
    for name, target in state.items():
        full = memory_prefix + name
        if full in tensors:  # stored under its in-memory name (a fused checkpoint of moepress 0.1)
            parts = {full: None}
        else:
            # the hub names transformers' table gives this tensor (shapes only, on meta); a plain rename
            # is copied whole, a split (fused experts -> per expert) is undone through an index tensor
            # run through the same conversion that wrote the checkpoint
            renamed = to_hub_layout(layout_owner, {full: torch.empty(target.shape, device="meta")})
            [(hub_name, hub)] = renamed.items() if len(renamed) == 1 else [(None, None)]
            if hub is not None and hub.shape == target.shape:
                parts = {hub_name: None}
            else:
                parts = to_hub_layout(layout_owner, {full: torch.arange(target.numel()).reshape(target.shape)})
        flat = target.data.view(-1)
        with torch.no_grad():
            for hub_name, positions in parts.items():
                if hub_name not in tensors:
                    raise KeyError(f"layer {index}: checkpoint tensor {hub_name!r} for {name!r} is missing")
                value = tensors[hub_name].to(device=target.device, dtype=target.dtype)
                if positions is None:
                    target.data.copy_(value.reshape(target.shape))
                else:
                    flat[positions.reshape(-1).to(target.device)] = value.reshape(-1)
        filled.add(name)
    return filled


def _served_class(model_type: str):
    module_name, class_name = VLLM_BASES[model_type]
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{module_name}"), class_name)
    family = family_facts(model_type)
    attr = family.hub_block  # the vLLM decoder layer's MoE attribute has the hub's name

    class Served(base):
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            config = vllm_config.model_config.hf_config
            dtype = vllm_config.model_config.dtype
            device = vllm_config.device_config.device
            layers_cfg = config.moepress.get("layers", {})
            self._moepress_config = config
            self._moepress_blocks: dict[int, nn.Module] = {}  # opaque-op layers
            self._moepress_fused: dict[int, FusedMoeBlock] = {}  # FusedMoE layers
            for index, block in _hf_blocks(config).items():
                layer = self.model.layers[index]
                if not hasattr(layer, attr):  # a pipeline-parallel placeholder: not on this rank
                    continue
                stock = getattr(layer, attr)
                _drop_fused_moe(vllm_config, stock)
                name = f"{prefix}.model.layers.{index}.{attr}" if prefix else f"model.layers.{index}.{attr}"
                layer_cfg = layers_cfg[str(index)]
                if fused_path(config.model_type, layer_cfg):
                    fused = FusedMoeBlock(stock, config, block, layer_cfg["kind"], name)
                    setattr(layer, attr, fused)
                    self._moepress_fused[index] = fused
                else:
                    setattr(layer, attr, ServedMoepressBlock(_place(block, device, dtype), name))
                    self._moepress_blocks[index] = block
            _order_moe_layers(vllm_config, self)
            if hasattr(self, "moe_layers"):  # the MoE bookkeeping vLLM keeps for stock layers only
                live = {id(m) for m in self.modules()}
                self.moe_layers = [m for m in self.moe_layers if id(m) in live]
                self.num_moe_layers = len(self.moe_layers)

        def load_weights(self, weights):
            # a replaced layer's tensors: under the hub's block name, or the in-memory `mlp` name (the
            # fused checkpoints of moepress 0.1). Opaque layers: `_load_block` maps either to the
            # block's parameters. FusedMoE layers: renamed to the hub's block name and handed to
            # vLLM's loader (a remapped layer's merged experts split per expert: `hub_weights`).
            blocks = {**self._moepress_blocks, **self._moepress_fused}
            prefixes = {f"model.layers.{i}.{block}.": i for i in blocks for block in {attr, "mlp"}}
            pending: dict[int, dict[str, torch.Tensor]] = {i: {} for i in self._moepress_blocks}

            def stock_weights():
                for name, tensor in weights:
                    prefix = next((p for p in prefixes if name.startswith(p)), None)
                    if prefix is None:
                        yield name, tensor
                        continue
                    index = prefixes[prefix]
                    if index in self._moepress_fused:
                        hub = f"model.layers.{index}.{attr}"
                        yield from self._moepress_fused[index].hub_weights(hub, {hub + "." + name[len(prefix):]: tensor})
                    else:
                        pending[index][name] = tensor

            loaded = set(super().load_weights(stock_weights()))
            for index, block in self._moepress_blocks.items():
                filled = _load_block(block, self._moepress_config, index, pending[index])
                loaded |= {f"model.layers.{index}.{attr}.block.{name}" for name in filled}
            return loaded

    Served.__name__ = Served.__qualname__ = f"Moepress{family.causal_lm_class}"
    return Served


_BUILT: dict[str, type] = {}


def __getattr__(name: str):
    """`Moepress<Family>ForCausalLM`, built on first use (importing only that family's vLLM model)."""
    for model_type in VLLM_BASES:
        if name == f"Moepress{family_facts(model_type).causal_lm_class}":
            if name not in _BUILT:
                _BUILT[name] = _served_class(model_type)
            return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
