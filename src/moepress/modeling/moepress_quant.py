"""Weight-only quantized expert tensors (int8, float8_e4m3fn). Ships inside checkpoints.

A quantized checkpoint stores each quantized expert tensor `W` (e.g. a block's fused
`gate_up_proj [E, 2I, H]`) as two plain safetensors tensors under the tensor's own name:
`NAME.qdata` (int8 or float8_e4m3fn, the shape of W) and `NAME.scale` (one value per output channel
of each expert: W's shape with the input dimension set to 1, in the model's dtype). The value is
`W ≈ qdata · scale` (symmetric, zero point 0), the affine form of torchao's `quant_primitives`:
moepress quantizes with torchao (`moepress.quantize`), and this file dequantizes with torchao's
`dequantize_affine` (int8) / `_dequantize_affine_float8` (fp8) when torchao is importable, else with
the same formula written in torch (`qdata.float() * scale`, cast to the scale's dtype; the two agree
bit for bit, a test checks it). Nothing here needs torchao or moepress: torch + transformers only.

`QuantizedWeight` is an `nn.Module` registered under the name the full-precision Parameter had, so
block code that indexes experts (`self.gate_up_proj[j]`, `ExpertFormat.stored_expert`) receives
expert j dequantized, and only the experts a token batch routes to are dequantized, one at a time.
Only blocks whose forward indexes experts this way can hold it (`QUANTIZABLE` per block kind).

`config.moepress["layers"][i]["quant"] = {"scheme": ..., "tensors": {name: input_dim}}` says which
tensors of layer i's block are quantized; `apply_quant_layout` turns a freshly built block's
Parameters into empty `QuantizedWeight`s of the same shapes before the checkpoint is read into them.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

SCHEMES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

# Block kind -> the tensors quantized. The remapped block indexes its experts (`w[j]`): only the
# experts a batch routes to are dequantized. The delta block (D²-MoE) multiplies whole tensors (the
# shared base runs on every token, the factors are gathered per pair): its tensors are dequantized
# whole once per forward call (`WHOLE_TENSOR_KINDS`, forward hooks), which the base needs anyway.
QUANTIZABLE = {"remap": ("gate_up_proj", "down_proj"),
               "delta": ("base_gate_up", "base_down", "gate_up_v", "gate_u", "up_u", "down_v", "down_u")}
WHOLE_TENSOR_KINDS = ("delta",)

_TORCHAO = None  # (dequantize_affine, _dequantize_affine_float8) once looked up; False when absent


def _torchao_functions():
    global _TORCHAO
    if _TORCHAO is None:
        # torchao is optional here (a checkpoint must load with torch + transformers alone), hence
        # importlib rather than an import statement; absent or broken, the torch formula is used.
        try:
            primitives = importlib.import_module("torchao.quantization.quant_primitives")
            _TORCHAO = (primitives.dequantize_affine, primitives._dequantize_affine_float8)
        except Exception:
            _TORCHAO = False
    return _TORCHAO


def dequantize(qdata: torch.Tensor, scale: torch.Tensor, input_dim: int, use_torchao: bool = True) -> torch.Tensor:
    """`qdata · scale` in `scale.dtype`; `scale` has size 1 along `input_dim` (a negative dim)."""
    functions = _torchao_functions() if use_torchao else False
    if functions:
        dequantize_affine, dequantize_float8 = functions
        if qdata.dtype == torch.int8:
            block = [1] * qdata.dim()
            block[input_dim] = qdata.shape[input_dim]
            return dequantize_affine(qdata, tuple(block), scale, None, torch.int8, output_dtype=scale.dtype)
        return dequantize_float8(qdata, scale.float(), output_dtype=scale.dtype)
    return (qdata.to(torch.float32) * scale.to(torch.float32)).to(scale.dtype)


class QuantizedWeight(nn.Module):
    """A weight stored as `qdata` (int8 / float8_e4m3fn) + per-output-channel `scale` (see module doc).

    Args:
        shape: the full-precision tensor's shape (leading dims index experts).
        scheme: "int8" or "fp8".
        input_dim: the dim reduced by the matmul (-1 for `[.., out, in]`, -2 for `[.., in, out]`).
        dtype: the dtype of the scale and of dequantized values (the model's dtype).
    """

    is_quantized_weight = True

    def __init__(self, shape, scheme: str, input_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"quantization scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
        self.scheme, self.input_dim = scheme, int(input_dim)
        scale_shape = list(shape)
        scale_shape[self.input_dim] = 1
        self.register_buffer("qdata", torch.zeros(tuple(shape), dtype=SCHEMES[scheme]))
        self.register_buffer("scale", torch.ones(tuple(scale_shape), dtype=dtype))

    @property
    def shape(self) -> torch.Size:
        return self.qdata.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def __getitem__(self, index) -> torch.Tensor:
        """The dequantized slice along the leading (expert) dims, e.g. expert j: `w[j]`."""
        return dequantize(self.qdata[index], self.scale[index], self.input_dim)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qdata, self.scale, self.input_dim)

    def numel(self) -> int:
        return self.qdata.numel()

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)` converts every floating tensor, and float8 counts as floating: keep the
        # stored dtype (values survive the round trip: e4m3 is exact in fp16/bf16/fp32).
        stored = self.qdata.dtype
        super()._apply(fn, recurse)
        if self.qdata.dtype != stored:
            self.qdata = self.qdata.to(stored)
        return self

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, shape={tuple(self.shape)}, input_dim={self.input_dim}, dtype={self.dtype}"


def install_quantized(block: nn.Module, name: str, weight: QuantizedWeight) -> None:
    """Put `weight` where the Parameter `name` of `block` was."""
    if name in block._parameters:
        del block._parameters[name]
    setattr(block, name, weight)


def _materialise(block: nn.Module, args) -> None:
    # An instance attribute shadows the submodule of the same name (nn.Module.__getattr__ is only
    # the fallback), so the block's forward reads plain dequantized tensors under the usual names.
    for name in block.moepress_quant["tensors"]:
        block.__dict__[name] = block._modules[name].dequantize()


def _release(block: nn.Module, args, output) -> None:
    for name in block.moepress_quant["tensors"]:
        block.__dict__.pop(name, None)


def mark_quantized(block: nn.Module, scheme: str, tensors: dict) -> None:
    """Record which tensors of `block` are quantized (`layer_config()["quant"]` on export) and, for a
    block whose forward uses whole tensors, dequantize them around each forward call."""
    block.moepress_quant = {"scheme": scheme, "tensors": dict(tensors)}
    if block.kind in WHOLE_TENSOR_KINDS and not getattr(block, "_moepress_quant_hooks", None):
        block._moepress_quant_hooks = (block.register_forward_pre_hook(_materialise),
                                       block.register_forward_hook(_release, always_call=True))


def apply_quant_layout(block: nn.Module, quant: dict) -> None:
    """Replace the tensors named in `quant["tensors"]` by empty `QuantizedWeight`s of their shapes
    (the checkpoint is then read into them)."""
    scheme = quant["scheme"]
    for name, input_dim in quant["tensors"].items():
        param = getattr(block, name)
        install_quantized(block, name, QuantizedWeight(param.shape, scheme, input_dim, param.dtype))
    mark_quantized(block, scheme, quant["tensors"])
