"""The one loader: every command and API call that opens a model or a tokenizer comes here.

`compress`, `load`, `evaluate`, `inspect`, `bench`, the zoo's report and fine-tuning all use
`load_pretrained`; a bounded-memory run opens the model layer by layer instead
(`run.store.open_streaming`) and takes its tokenizer from `load_tokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def load(path: str | Path, dtype: torch.dtype | str | None = torch.float32) -> nn.Module:
    """Load a model directory or hub id in eval mode, in `dtype` ("auto" = the checkpoint's own dtype;
    float32 by default, the safe choice for comparing logits).

    moepress outputs with custom blocks load as moepress's own classes, without
    `trust_remote_code`; stock models and stock results load as the stock transformers class.
    """
    import transformers

    check_model_files(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    # a local directory: its stored weights, else its config.json; a hub id: the downloaded config
    dtype = resolve_dtype(dtype, path if Path(str(path)).expanduser().is_dir() else config)
    if getattr(config, "moepress", None):
        from .modeling import modeling_moepress

        cls = getattr(modeling_moepress, modeling_moepress.class_name_for(config.model_type))
        return cls.from_pretrained(str(path), dtype=dtype).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def load_tokenizer(source, tokenizer=None, required: bool = True):
    """The tokenizer to use with `source` (a path, hub id or model object).

    Args:
        tokenizer: a tokenizer object (returned as is), a path or hub id, or None for the one
            saved beside the model (`source`'s directory, or a model object's `name_or_path`).
        required: when False, a source without a tokenizer gives None instead of an error
            (for work that reads no text, e.g. a method that needs no calibration).
    """
    import transformers

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    name = tokenizer if tokenizer is not None else _source_name(source)
    if not name:
        if not required:
            return None
        raise ValueError("this model object has no name_or_path to find its tokenizer: pass tokenizer=")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError):
        if required:
            raise
        return None


def load_pretrained(source, *, dtype: torch.dtype | str | None = torch.float32, tokenizer=None,
                    require_tokenizer: bool = True) -> tuple[nn.Module, object]:
    """`(model, tokenizer)` from a model directory, hub id or model object.

    A model object is returned as it is (same object, mode unchanged); a path or hub id is
    loaded with `load` in `dtype`. The tokenizer follows `load_tokenizer(source, tokenizer,
    require_tokenizer)`.
    """
    model = load(source, dtype) if isinstance(source, (str, Path)) else source  # a dtype name is resolved in load
    return model, load_tokenizer(source, tokenizer, required=require_tokenizer)


def _source_name(source) -> str | None:
    if isinstance(source, (str, Path)):
        return str(source)
    return getattr(source, "name_or_path", None) or None


def check_model_files(path: str | Path) -> None:
    """A clear error for a missing directory, an unreachable hub id or a truncated safetensors file."""
    from .checks import check_model_source, check_safetensors_files

    check_model_source(path)
    check_model_family(path)
    check_safetensors_files(path)


_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def check_model_family(path: str | Path) -> None:
    """A local model's `model_type` is a supported MoE family; a dense model is told it is not an MoE
    model, an MoE model of another family which families are supported."""
    from .arch import SUPPORTED
    from .checks import InputError, model_type_of

    model_type = model_type_of(path)
    if model_type is None or model_type in SUPPORTED:
        return
    import json

    config = json.loads((Path(str(path)).expanduser() / "config.json").read_text())
    if config.get("moepress") or config.get("moepress_base_model_type") in SUPPORTED:
        return  # a moepress output: its family is checked when loading
    if not any(config.get(key) for key in _EXPERT_KEYS):
        raise InputError(f"{path} is a {model_type!r} model without routed experts: not a Mixture-of-Experts "
                         f"model, nothing for moepress to compress (supported MoE families: {', '.join(SUPPORTED)})")
    raise InputError(f"{path} is a {model_type!r} MoE model; moepress supports the families {', '.join(SUPPORTED)}")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored_dtypes(path: str | Path) -> dict[torch.dtype, int]:
    """Bytes of floating-point tensor data per dtype in a local model directory's safetensors files,
    read from their headers only (no tensor is loaded); empty for a hub id or a directory without them."""
    from .arch.checkpoint import SAFETENSORS_DTYPES
    from .checks import safetensors_header

    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        return {}
    totals: dict[torch.dtype, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            header = safetensors_header(file)
        except (OSError, ValueError):
            continue  # a damaged file is reported by check_safetensors_files, not here
        for name, entry in header.items():
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype")) if name != "__metadata__" else None
            if dtype is not None and dtype.is_floating_point:
                start, end = entry["data_offsets"]
                totals[dtype] = totals.get(dtype, 0) + end - start
    return totals


def tensor_bytes_on_disk(path: str | Path) -> int | None:
    """Bytes of tensor data in a local model directory's safetensors files: what the checkpoint's
    weights take on disk; None when not local."""
    from .checks import safetensors_data_bytes

    folder = Path(str(path)).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sum(safetensors_data_bytes(file) for file in files) if files else None


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The floating dtype that holds most of a local checkpoint's weight bytes (None when it has no
    local safetensors files). A norm or a router kept in float32 beside float16 experts does not count."""
    totals = stored_dtypes(path)
    return max(totals, key=totals.get) if totals else None


def config_dtype(source) -> torch.dtype | None:
    """The dtype a config (object, or a local directory's config.json) declares, or None."""
    value = getattr(source, "dtype", None) or getattr(source, "torch_dtype", None)
    if value is None and isinstance(source, (str, Path)):
        import json

        config = Path(str(source)).expanduser() / "config.json"
        data = json.loads(config.read_text()) if config.is_file() else {}
        value = data.get("dtype") or data.get("torch_dtype")
    if isinstance(value, str):
        value = DTYPES.get(value.removeprefix("torch."))
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def source_dtype(source) -> torch.dtype:
    """The floating dtype a model is stored in: a model object's parameters; for a local directory the
    dtype of its stored weights (safetensors headers), which wins over what `config.json` declares
    (a config may say float32 over float16 files); else the config's `dtype` (`torch_dtype` in older
    configs); else float32 (transformers' own default when none is recorded)."""
    if isinstance(source, nn.Module):
        return next((p.dtype for p in source.parameters() if p.is_floating_point()), torch.float32)
    if isinstance(source, (str, Path)):
        stored = stored_dtype(source)
        if stored is not None:
            return stored
    return config_dtype(source) or torch.float32


def dtype_disagreement(source) -> str | None:
    """A sentence for the record when a local checkpoint's config declares another dtype than its
    weights are stored in (`dtype auto` follows the weights); None when they agree or it is not local."""
    if not isinstance(source, (str, Path)):
        return None
    stored, declared = stored_dtype(source), config_dtype(source)
    if stored is None or declared is None or stored == declared:
        return None
    return (f"the source's weights are stored in {dtype_name(stored)} while its config.json says "
            f"{dtype_name(declared)}: dtype auto follows the stored weights")


def resolve_dtype(dtype: torch.dtype | str | None, source) -> torch.dtype | None:
    """`dtype` as a torch dtype: "auto" = `source_dtype(source)` (a path, config or model), a name from
    `DTYPES`, a torch dtype as is, None as is (the library's default)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return source_dtype(source)
    if dtype not in DTYPES:
        from .checks import InputError

        raise InputError(f"dtype must be auto, {', '.join(DTYPES)} or a torch dtype; got {dtype!r}")
    return DTYPES[dtype]


def evaluation_dtype(dtype: torch.dtype | str | None, source, device=None) -> torch.dtype | None:
    """The dtype to *run* a model in for evaluation or inspection: `resolve_dtype`, except that "auto"
    runs a half-precision checkpoint (float16 / bfloat16 on disk) in float32 on a CPU, where half
    matmuls are slow and float16 ones lossy; on a GPU "auto" runs it as stored. The output of
    `compress` keeps following `resolve_dtype` (the dtype on disk). An explicit dtype is obeyed."""
    resolved = resolve_dtype(dtype, source)
    on_cpu = device is None or torch.device(device).type == "cpu"
    if dtype == "auto" and on_cpu and resolved in (torch.float16, torch.bfloat16):
        return torch.float32
    return resolved
