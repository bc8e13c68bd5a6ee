"""Weight-only quantization of routed experts, after compression or alone (docs/design.md#flags `--quantize`).

The numerics are torchao's (`torchao.quantization.quant_primitives`, pinned in pyproject.toml):
- int8: `choose_qparams_affine(MappingType.SYMMETRIC)` + `quantize_affine`, block size one output
  channel of one expert (range [-128, 127], scale = max|row| / 127.5, zero point 0);
- fp8: `_choose_scale_float8` + `_quantize_affine_float8` to float8_e4m3fn with the same granularity
  (scale = max|row| / 448). These two are underscored in torchao 0.18 but are the functions its own
  `Float8Tensor` uses; the pin keeps them stable.
moepress writes only the glue: which tensors, their input dim, where the result lives.

Why not transformers' `TorchAoConfig` / `quantize_(model, Int8WeightOnlyConfig())`: both quantize
`nn.Linear` modules, and transformers 5 stores a layer's experts as fused 3-D Parameters
(`experts.gate_up_proj [E, 2I, H]`), which they leave in full precision (ENVIRONMENT.md). So the
experts are addressed directly: a stock MoE block (an uncompressed or pruned layer) becomes the
remapped block with the identity map (`moepress_remap.py`, which reproduces the stock block), and
the expert tensors of a remapped/merged block are replaced by `QuantizedWeight`s
(`modeling/moepress_quant.py`, shipped with the checkpoint, which dequantizes the experts a batch
routes to). Attention, routers, shared experts, embeddings and the head stay in full precision.
The checkpoint is therefore always a custom (auto_map) one: `from_pretrained(out,
trust_remote_code=True)` or `moepress.load(out)`.

Supported blocks: stock MoE blocks of every family, the `remap` block (merging methods) and the
`delta` block (D²-MoE: base and U/V factors, one scale per output row of each; dequantized whole
once per forward, since the base serves every token). The low-rank (MoE-I²) and compressed-experts
blocks are refused with a clear error (not done: their forwards would need the same treatment and
tests).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .arch import decoder_layers, family_of
from .arch.model import is_stock_moe_block
from . import output_lock
from .checks import QUANTIZE_CHOICES, InputError
from .modeling.moepress_quant import QUANTIZABLE, SCHEMES, QuantizedWeight, install_quantized, mark_quantized

CHOICES = QUANTIZE_CHOICES  # "none" and every scheme of SCHEMES (tests/test_quantize.py)
LIBRARY = "torchao"


def check_scheme(scheme: str | None) -> str | None:
    """The scheme to apply, or None for "none"/None; anything else is an InputError."""
    if scheme is None or scheme == "none":
        return None
    if scheme not in SCHEMES:
        raise InputError(f"quantize must be one of {', '.join(CHOICES)}; got {scheme!r}")
    return scheme


def _torchao():
    try:
        from torchao.quantization import quant_primitives
    except ImportError as exc:
        raise InputError(f"quantization uses torchao, which is not importable ({exc}); install the pinned "
                         f"version: pip install 'moepress[quant]' (torchao==0.18.0)") from exc
    return quant_primitives


def library_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(LIBRARY)
    except metadata.PackageNotFoundError:
        return None


def quantize_tensor(weight: torch.Tensor, scheme: str, input_dim: int,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(qdata, scale)` of `weight` with one symmetric scale per output channel (all dims but `input_dim`).

    The scale is rounded to `scale_dtype` (default: the weight's dtype, the dtype the checkpoint
    stores it in) before the values are quantized with it, so qdata is right for the stored scale.
    """
    qp = _torchao()
    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach().to(torch.float32)
    block = [1] * w.dim()
    block[input_dim] = w.shape[input_dim]
    block = tuple(block)
    if scheme == "int8":
        scale, _ = qp.choose_qparams_affine(w, qp.MappingType.SYMMETRIC, block, torch.int8,
                                            eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32,
                                            keepdim=True)
    else:
        scale = qp._choose_scale_float8(w, list(block), SCHEMES[scheme])
    # representable and non-zero in the stored dtype (an all-zero channel keeps qdata 0)
    scale = scale.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    if scheme == "int8":
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)  # symmetric
        qdata = qp.quantize_affine(w, block, scale.float(), zero, torch.int8)
    else:
        qdata = qp._quantize_affine_float8(w, scale.float(), SCHEMES[scheme])
    return qdata, scale


def _stock_to_remap(block: nn.Module, config) -> nn.Module:
    """The identity-map remapped block holding a stock MoE block's experts (same outputs)."""
    from .modeling.moepress_family import ExpertFormat, family_facts
    from .modeling.moepress_remap import RemappedMoeBlock

    experts = block.experts
    fmt = ExpertFormat(family_facts(config.model_type), config)
    biases = (experts.gate_up_proj_bias, experts.down_proj_bias) if fmt.biased else (None, None)
    view = fmt.unpack(experts.gate_up_proj, experts.down_proj, *biases)
    count = view["gate"].shape[0]
    remap = RemappedMoeBlock.from_weights(block, config, torch.arange(count), view["gate"], view["up"], view["down"],
                                          view["gate_bias"], view["up_bias"], view["down_bias"])
    return remap.to(experts.gate_up_proj.dtype)


def state_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s state dict (parameters and persistent buffers), shared tensors once: what a
    checkpoint of it stores (a rotary `inv_freq` buffer is not saved, so it is not counted)."""
    seen, total = set(), 0
    for tensor in module.state_dict(keep_vars=True).values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def quantize_experts(model: nn.Module, scheme: str) -> dict:
    """Quantize the routed experts of every MoE layer of `model` in place; returns the record entry.

    Stock MoE blocks become identity-map remapped blocks first (module doc). A custom block whose
    kind cannot hold quantized experts, or a model already quantized, is an InputError.
    """
    scheme = check_scheme(scheme)
    if scheme is None:
        raise InputError("quantize_experts needs a scheme: " + ", ".join(SCHEMES))
    _torchao()
    t0 = time.perf_counter()
    spec = family_of(model)
    before = state_bytes(model)
    plan = []
    for i, layer in enumerate(decoder_layers(model)):
        block = spec.block_of(layer)
        if block is None:
            continue
        if getattr(block, "moepress_quant", None):
            raise InputError(f"layer {i}'s experts are already quantized ({block.moepress_quant['scheme']}); "
                             f"quantize the unquantized model instead")
        if getattr(block, "is_moepress_block", False):
            if block.kind not in QUANTIZABLE:
                raise InputError(f"layer {i} is a {block.kind!r} block, which --quantize does not support; it "
                                 f"supports stock (pruned or uncompressed), merged (remap) and D²-MoE (delta) "
                                 f"blocks: {', '.join(['stock', *QUANTIZABLE])}")
            plan.append((i, layer, False))
        elif is_stock_moe_block(block, spec):
            plan.append((i, layer, True))
    if not plan:
        raise InputError("this model has no MoE layer whose experts can be quantized")
    expert_before = expert_after = 0
    layers = {}
    for i, layer, stock in plan:
        if stock:
            spec.set_block(layer, _stock_to_remap(spec.block_of(layer), model.config))
        block = spec.block_of(layer)
        # the remapped block keeps the family's layout (gpt-oss: [.., in, out]); delta tensors are [.., out, in]
        input_dim = -2 if block.kind == "remap" and block.expert_format.interleaved else -1
        tensors = {}
        for name in QUANTIZABLE[block.kind]:
            param = getattr(block, name)
            qdata, scale = quantize_tensor(param.data, scheme, input_dim)
            weight = QuantizedWeight(param.shape, scheme, input_dim, param.dtype).to(param.device)
            with torch.no_grad():
                weight.qdata.copy_(qdata)
                weight.scale.copy_(scale)
            expert_before += param.numel() * param.element_size()
            expert_after += state_bytes(weight)
            install_quantized(block, name, weight)
            tensors[name] = input_dim
        mark_quantized(block, scheme, tensors)
        layers[str(i)] = {"block": "stock->remap" if stock else block.kind, "tensors": sorted(tensors)}
    return {
        "scheme": scheme,
        "storage_dtype": str(SCHEMES[scheme]).removeprefix("torch."),
        "granularity": "symmetric, one scale per output channel of each expert",
        "library": LIBRARY,
        "library_version": library_version(),
        "layers": layers,
        "expert_bytes_before": expert_before,
        "expert_bytes_after": expert_after,
        "model_bytes_before": before,
        "model_bytes_after": state_bytes(model),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def quantize(model, scheme: str = "int8", *, out: str | Path | None = None, overwrite: bool = False,
             dtype: torch.dtype | str = "auto"):
    """Quantization alone: quantize the routed experts of a model (path, hub id or model object; an
    uncompressed model or an unquantized moepress output) and, with `out`, save the checkpoint.

    Returns the checkpoint directory when `out` is given, else the quantized model (in memory; a model
    object given is quantized in place, as `compress` edits one in place).
    `dtype` is the dtype of everything left in full precision ("auto" = the source's own).
    """
    from .export import check_output_dir

    scheme = check_scheme(scheme)
    if scheme is None:
        raise InputError(f"quantize needs a scheme: {', '.join(SCHEMES)}")
    source = str(model) if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
    if out is None:
        return _quantize_to(model, scheme, None, source, dtype)
    output_lock.refuse_if_busy(out)  # a live run on `out` is the problem to name, not its half-made output
    target = check_output_dir(out, source, overwrite)
    with output_lock.acquire(target.path):  # held to the end of the save, as compress's
        return _quantize_to(model, scheme, target, source, dtype)


def _quantize_to(model, scheme: str, target, source: str | None, dtype):
    """The body of `quantize` once the output (None: none) is checked and locked."""
    from .export import save_checkpoint
    from .loading import dtype_name, load_pretrained, resolve_dtype, tensor_bytes_on_disk
    from .record import library_versions, read_record

    out_dtype = resolve_dtype(dtype, model)
    model_obj, tokenizer = load_pretrained(model, dtype=out_dtype, require_tokenizer=False)
    model_obj.to(out_dtype)
    entry = quantize_experts(model_obj, scheme)
    if target is None:
        return model_obj
    # sizes on disk against sizes on disk: the source's files as stored (not its in-memory dtype), the
    # output as it will be written (its state in out_dtype, shared tensors once, equals its files)
    on_disk = tensor_bytes_on_disk(model) if isinstance(model, (str, Path)) else None
    if on_disk is not None:
        entry["model_bytes_before"] = on_disk
    base = (read_record(model) if isinstance(model, (str, Path)) and Path(str(model)).is_dir() else None) or {}
    record = {**base, "moepress_record": 1, "source_model": base.get("source_model", source),
              "quantized_from": source, "dtype": dtype_name(out_dtype), "quantization": entry,
              "versions": library_versions()}
    record.setdefault("method", "quantize")
    return save_checkpoint(model_obj, target, method_name=record["method"], export="custom", record=record,
                           tokenizer=tokenizer, source=source)
