"""vLLM models of moepress checkpoints (imported by vLLM only, through `vllm_plugin`).

`Moepress<Family>ForCausalLM` is the family's own vLLM model (vLLM's attention, linear layers,
FusedMoE, rotary, sampler) in which every decoder layer that `config.moepress["layers"]` lists has
its MoE module replaced by moepress's block of that kind (the very module transformers runs:
`modeling/`), so what vLLM serves computes what `moepress.load` computes: remapped (merged) experts,
per-layer expert counts, D²-MoE base + low-rank deltas, Compressed Experts (with or without
mini-experts), MoE-I² low-rank experts and weight-only quantized experts alike. The block runs as
one opaque custom op (`moepress::served_block`), so vLLM's graph capture treats it as a leaf.

Weights: the checkpoint is in the family's hub layout (`modeling/moepress_layout.py`); the tensors
of a replaced layer are mapped back to the block's own parameters with transformers' conversion
table (the same one that wrote them), everything else goes to vLLM's own loader.
"""

from __future__ import annotations

import copy
import importlib
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
            self._moepress_config = config
            self._moepress_blocks: dict[int, nn.Module] = {}
            for index, block in _hf_blocks(config).items():
                layer = self.model.layers[index]
                if not hasattr(layer, attr):  # a pipeline-parallel placeholder: not on this rank
                    continue
                _drop_fused_moe(vllm_config, getattr(layer, attr))
                name = f"{prefix}.model.layers.{index}.{attr}" if prefix else f"model.layers.{index}.{attr}"
                setattr(layer, attr, ServedMoepressBlock(_place(block, device, dtype), name))
                self._moepress_blocks[index] = block
            if hasattr(self, "moe_layers"):  # the MoE bookkeeping vLLM keeps for stock layers only
                live = {id(m) for m in self.modules()}
                self.moe_layers = [m for m in self.moe_layers if id(m) in live]
                self.num_moe_layers = len(self.moe_layers)

        def load_weights(self, weights):
            # a replaced layer's tensors: under the hub's block name, or the in-memory `mlp` name (the
            # fused checkpoints of moepress 0.1); `_load_block` maps either to the block's parameters
            prefixes = {f"model.layers.{i}.{block}.": i for i in self._moepress_blocks for block in {attr, "mlp"}}
            pending: dict[int, dict[str, torch.Tensor]] = {i: {} for i in self._moepress_blocks}

            def stock_weights():
                for name, tensor in weights:
                    prefix = next((p for p in prefixes if name.startswith(p)), None)
                    if prefix is None:
                        yield name, tensor
                    else:
                        pending[prefixes[prefix]][name] = tensor

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
