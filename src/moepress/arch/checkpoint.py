"""Reading checkpoint tensors one at a time, in either on-disk layout (ENVIRONMENT.md §2 pitfall).

`save_pretrained` writes the hub's per-expert layout by default (`...experts.{j}.w1.weight` for
Mixtral/PhiMoE, `...experts.{j}.gate_proj.weight` for Qwen/OLMoE/DeepSeek) while the model in
memory holds fused `experts.gate_up_proj [E, 2I, H]`; `save_original_format=False` writes the
fused keys. `CheckpointReader.tensor(name)` answers an in-memory parameter name from either.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .spec import FamilySpec

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointReader:
    """Lazy access to the safetensors files of a model directory (single file or sharded index)."""

    def __init__(self, path: str | Path, spec: FamilySpec):
        self.path = Path(path)
        self.spec = spec
        block, router = re.escape(spec.block_attr), re.escape(spec.router_attr)  # in-memory names: the family's
        self._fused = re.compile(rf"^(?P<layer>.*)\.{block}\.experts\.(?P<kind>gate_up_proj|down_proj)$")
        self._router = re.compile(rf"^(?P<layer>.*)\.{block}\.{router}\.weight$")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").exists():
            with safe_open(self.path / "model.safetensors", "pt") as fh:
                weight_map = {k: "model.safetensors" for k in fh.keys()}
        else:
            raise FileNotFoundError(f"{self.path} holds no model.safetensors(.index.json): cannot stream it")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def close(self) -> None:
        """Close the open files."""
        for handle in self._handles.values():
            handle[0].close()
        self._handles.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def stored_dtype(self, key: str) -> torch.dtype | None:
        """The dtype `key` is stored in (None: not stored under that name, or a dtype not listed here)."""
        if key not in self:
            return None
        from ..checks import safetensors_header

        return SAFETENSORS_DTYPES.get(safetensors_header(self.path / self.weight_map[key])[key]["dtype"])

    def _raw(self, key: str) -> torch.Tensor:
        """One tensor read with plain file reads into its own buffer, not through a memory map: the
        pages of a mapped checkpoint count in the process's resident set until unmapped (a layer of a
        30B MoE is over 1 GB), read pages only enter the page cache, which the kernel can drop.
        (The safetensors format: 8-byte little-endian header length, JSON header, raw data.)"""
        fname = self.weight_map[key]
        if fname not in self._handles:
            fh = open(self.path / fname, "rb")
            size = int.from_bytes(fh.read(8), "little")
            self._handles[fname] = (fh, 8 + size, json.loads(fh.read(size)))
        fh, start, header = self._handles[fname]
        info = header[key]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:  # a dtype this reader does not know: let safetensors decode it
            with safe_open(self.path / fname, "pt") as st:
                return st.get_tensor(key).clone()
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        fh.seek(start + begin)
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = fh.readinto(view[done:])
            if not n:
                raise OSError(f"{self.path / fname}: truncated while reading {key}")
            done += n
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def _per_expert(self, layer: str, which: int) -> torch.Tensor:
        names = self.spec.hub_expert_names
        prefix = f"{layer}.{self.spec.hub_block}.experts."
        out, j = [], 0
        while f"{prefix}{j}.{names[which]}.weight" in self:
            out.append(self._raw(f"{prefix}{j}.{names[which]}.weight"))
            j += 1
        if not out:
            raise KeyError(prefix)
        return torch.stack(out)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor the in-memory model calls `name`, whichever layout the files use."""
        if name in self:
            return self._raw(name)
        fused, router = self._fused.match(name), self._router.match(name)
        try:
            if fused and self.spec.hub_expert_names is not None:
                layer = fused["layer"]
                if fused["kind"] == "down_proj":
                    return self._per_expert(layer, 2)
                return torch.cat([self._per_expert(layer, 0), self._per_expert(layer, 1)], dim=1)
            if router:
                # the hub names every router `gate` (PhiMoE's in-memory `router` included)
                alt = f"{router['layer']}.{self.spec.hub_block}.gate.weight"
                if alt in self:
                    return self._raw(alt)
        except KeyError:
            pass
        raise KeyError(f"tensor {name!r} not found in {self.path} (neither fused nor per-expert layout)")

    def copy_into(self, name: str, dest: torch.Tensor) -> None:
        """`dest.copy_(self.tensor(name))` (cast to `dest`'s dtype) without a full-size temporary:
        a per-expert checkpoint is copied expert by expert into the fused destination, so reading
        a layer of 128 experts costs no transient copy of its experts (bounded-memory runs)."""
        fused = self._fused.match(name)
        if name in self or not fused or self.spec.hub_expert_names is None or dest.dim() != 3:
            dest.copy_(self.tensor(name))
            return
        names = self.spec.hub_expert_names
        prefix = f"{fused['layer']}.{self.spec.hub_block}.experts."
        if f"{prefix}0.{names[0]}.weight" not in self:
            dest.copy_(self.tensor(name))  # raises the usual KeyError
            return
        if f"{prefix}{dest.shape[0]}.{names[0]}.weight" in self or f"{prefix}{dest.shape[0] - 1}.{names[2]}.weight" not in self:
            raise ValueError(f"{self.path}: the expert count of {prefix}* differs from the model's {dest.shape[0]}")
        for j in range(dest.shape[0]):
            if fused["kind"] == "down_proj":
                dest[j].copy_(self._raw(f"{prefix}{j}.{names[2]}.weight"))
            else:  # gate rows first, then up rows
                gate = self._raw(f"{prefix}{j}.{names[0]}.weight")
                dest[j, : gate.shape[0]].copy_(gate)
                dest[j, gate.shape[0]:].copy_(self._raw(f"{prefix}{j}.{names[1]}.weight"))
