"""Synthetic checkpoints of real MoE configurations, written without holding the model in memory.

Benchmarks of the bounded-memory path need a checkpoint with a real model's width (e.g.
Qwen3-30B-A3B: hidden 2048, 128 experts of 768) that is bigger than the memory cap the run is
held to, and no real weights can be downloaded here. `write_synthetic_checkpoint` builds the
model on the meta device (shapes only), then generates each tensor from its own seeded generator
and writes the checkpoint shard by shard (embeddings, one shard per decoder layer, final norm +
head), so its peak memory is one decoder layer whatever the depth.

The files use the layout `save_pretrained` writes (the hub's per-expert keys,
`{layer}.{hub_block}.experts.{j}.{gate|up|down}.weight`, for the families that have one;
`layout="fused"` writes the in-memory fused keys instead); both load with `from_pretrained`.
Each value is a pure function of (seed, tensor name, expert index), so `synthetic_state_dict`
rebuilds exactly what was written (tests compare the two).

Weights are random (normal, `std`; norm weights 1): they exercise memory and time, never quality.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path

import torch
import transformers

from ..arch.families import FAMILIES

_FUSED = re.compile(r"^(?P<layer>.*)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(?P<layer>.*)\.mlp\.gate\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def qwen3_30b_a3b_config(num_layers: int = 4, **overrides) -> transformers.PretrainedConfig:
    """The Qwen3-30B-A3B configuration (its hub config.json's values) with `num_layers` decoder layers."""
    kwargs = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu", attention_bias=False,
        bos_token_id=151643, eos_token_id=151645, num_hidden_layers=num_layers,
    )
    kwargs.update(overrides)
    return transformers.Qwen3MoeConfig(**kwargs)


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(key.encode())) % (1 << 63))


def _random(shape, dtype: torch.dtype, std: float, seed: int, key: str) -> torch.Tensor:
    """One tensor drawn from its own generator, in chunks of 4 M values (float32 draw, then cast), so
    a large embedding costs no float32 copy of itself."""
    generator = _generator(seed, key)
    out = torch.empty(shape, dtype=dtype)
    for chunk in out.view(-1).split(1 << 22):
        chunk.copy_(torch.randn(chunk.numel(), generator=generator) * std)
    return out


def _value(name: str, shape: torch.Size, dtype: torch.dtype, std: float, seed: int) -> torch.Tensor:
    """The synthetic value of a non-expert tensor: norm weights 1, everything else normal(0, std)."""
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=dtype)
    return _random(shape, dtype, std, seed, name)


def _expert_slice(name: str, j: int, shape: torch.Size, dtype: torch.dtype, std: float, seed: int) -> torch.Tensor:
    """Expert `j`'s slice `[..]` of the fused tensor `name` `[E, ..]` (drawn per expert: bounded memory)."""
    return _random(shape[1:], dtype, std, seed, f"{name}#{j}")


def _meta_model(config) -> torch.nn.Module:
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _persistent_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Size]]:
    """Names and shapes of what a checkpoint stores (the state dict, a tied head left out)."""
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    return [(k, v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")]


def synthetic_state_dict(config, *, dtype: torch.dtype = torch.bfloat16, std: float = 0.02,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole synthetic model in memory, in-memory (fused) names: what the writer writes (small configs)."""
    state = {}
    for name, shape in _persistent_tensors(_meta_model(config)):
        if _FUSED.match(name):
            state[name] = torch.stack([_expert_slice(name, j, shape, dtype, std, seed) for j in range(shape[0])])
        else:
            state[name] = _value(name, shape, dtype, std, seed)
    return state


def _disk_tensors(name: str, shape: torch.Size, dtype, std, seed, family, layout: str):
    """`(key, shape, make)` for the tensors written for one in-memory tensor in the chosen disk
    layout; `make()` draws the value (called only when its bytes are written)."""
    fused = _FUSED.match(name)
    names = family.hub_expert_names
    hub = layout == "hub" and names is not None and family.expert_layout == "fused"
    if fused and hub:
        prefix = f"{fused['layer']}.{family.hub_block}.experts."
        for j in range(shape[0]):
            if fused["kind"] == "down_proj":
                yield (f"{prefix}{j}.{names[2]}.weight", shape[1:],
                       lambda j=j: _expert_slice(name, j, shape, dtype, std, seed))
            else:  # gate rows first, then up rows (the fused layout); one draw per expert serves both
                half = shape[1] // 2
                drawn = {}

                def part(j=j, lo=0, drawn=drawn):
                    if j not in drawn:
                        drawn.clear()
                        drawn[j] = _expert_slice(name, j, shape, dtype, std, seed)
                    return drawn[j][lo:lo + half]

                yield f"{prefix}{j}.{names[0]}.weight", (half, *shape[2:]), part
                yield f"{prefix}{j}.{names[1]}.weight", (half, *shape[2:]), lambda j=j, part=part: part(j, half)
        return
    if fused:
        yield name, shape, lambda: torch.stack([_expert_slice(name, j, shape, dtype, std, seed) for j in range(shape[0])])
        return
    router = _ROUTER.match(name)
    key = f"{router['layer']}.{family.hub_block}.gate.weight" if router and hub else name
    yield key, shape, lambda: _value(name, shape, dtype, std, seed)


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


def _write_safetensors(path: Path, entries: list[tuple[str, tuple, torch.dtype, object]]) -> int:
    """Write a safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is known
    from the shapes, then each value is drawn, written and dropped, so the file is never in memory.
    Returns the bytes of tensor data. (Format: 8-byte little-endian header length, JSON header
    padded with spaces to a multiple of 8, then the raw little-endian data in header order.)"""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype, _ in entries:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for key, shape, dtype, make in entries:
            value = make().contiguous()
            if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                raise AssertionError(f"{key}: drew {tuple(value.shape)} {value.dtype}, header says {shape} {dtype}")
            if value.numel():
                fh.write(memoryview(value.view(-1).view(torch.uint8).numpy()))  # no copy
    return offset


def write_synthetic_checkpoint(config, path: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                               std: float = 0.02, seed: int = 0, layout: str = "hub",
                               tokenizer_from: str | Path | None = None, progress=None) -> int:
    """Write a random-weight checkpoint of `config` to the new directory `path`; returns its bytes on disk.

    Shards: `embed` (everything before the first decoder layer), one per decoder layer, `final`
    (final norm, head); `model.safetensors.index.json` maps them, `config.json` records `dtype`.
    Written into a temporary sibling directory and renamed, so a crash never leaves a half
    checkpoint at `path`; an existing `path` is an error (a source model is never overwritten).

    Args:
        config: a transformers config of a supported MoE family.
        dtype: storage dtype of every floating tensor.
        std: standard deviation of the random weights (norm weights are 1).
        seed: generator seed; each tensor (each expert's slice) has its own stream from it.
        layout: "hub" (per-expert keys, as `save_pretrained` writes) or "fused" (in-memory keys).
        tokenizer_from: a directory whose tokenizer files are copied beside the weights.
        progress: optional callable `(shard_name, bytes)` after each shard.
    """
    if layout not in ("hub", "fused"):
        raise ValueError(f"layout must be 'hub' or 'fused', got {layout!r}")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: write_synthetic_checkpoint only creates new directories")
    family = FAMILIES[config.model_type]
    tensors = _persistent_tensors(_meta_model(config))
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, shape in tensors:
        layer = _LAYER.match(name)
        group = f"layer{int(layer[1]):04d}" if layer else ("embed" if "embed" in name else "final")
        groups.setdefault(group, []).append((name, shape))
    order = ["embed"] + sorted(g for g in groups if g.startswith("layer")) + ["final"]
    order = [g for g in order if g in groups]
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map, total = {}, 0
        for k, group in enumerate(order, 1):
            fname = f"model-{k:05d}-of-{len(order):05d}.safetensors"
            entries = [(key, tuple(shp), dtype, make) for name, shape in groups[group]
                       for key, shp, make in _disk_tensors(name, shape, dtype, std, seed, family, layout)]
            total += _write_safetensors(tmp / fname, entries)
            weight_map.update(dict.fromkeys((e[0] for e in entries), fname))
            if progress is not None:
                progress(fname, (tmp / fname).stat().st_size)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = config.__class__.from_dict(config.to_dict())
        config.dtype = dtype
        config.architectures = [family.causal_lm_class]
        config.save_pretrained(tmp)
        if tokenizer_from is not None:
            for f in Path(tokenizer_from).iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                    shutil.copy2(f, tmp / f.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(f.stat().st_size for f in path.iterdir())
