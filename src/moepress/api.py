"""The Python API of DESIGN.md §1: `compress`, `load`, and the result object."""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .arch import family_of, parameter_counts
from .calib import build_calibration
from .export import RECORD_NAME, library_versions, read_record, save_checkpoint  # noqa: F401
from .methods import Method, build_method
from .pipeline import compress_layers


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM: ru_maxrss would include a parent's at fork)."""
    try:
        with open("/proc/self/status") as fh:
            hwm = next(line for line in fh if line.startswith("VmHWM"))
        return round(int(hwm.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def load(path: str | Path, dtype: torch.dtype | str | None = torch.float32) -> nn.Module:
    """Load a model directory or hub id; moepress outputs with custom blocks load without
    `trust_remote_code` (stock models and stock results load as the stock class)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path))
    if getattr(config, "moepress", None):
        from .modeling import modeling_moepress

        cls = getattr(modeling_moepress, modeling_moepress.class_name_for(config.model_type))
        return cls.from_pretrained(str(path), dtype=dtype).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _load_tokenizer(model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    import transformers

    name = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
    if not name:
        raise ValueError("pass tokenizer= when compressing an in-memory model that has no name_or_path")
    return transformers.AutoTokenizer.from_pretrained(str(name))


@dataclass
class CompressionResult:
    """A compressed model in memory, its per-layer decisions and the replayable record."""

    model: nn.Module
    tokenizer: object
    method: Method
    records: dict[int, dict]
    record: dict = field(default_factory=dict)
    source: str | None = None
    store: object = None  # StreamingLayers of a bounded-memory run (layers then live on disk)

    @property
    def parameter_counts(self) -> dict:
        return parameter_counts(self.model)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write the checkpoint + tokenizer + moepress.json atomically; returns the directory."""
        t0 = time.perf_counter()
        stages = self.record.setdefault("stages", {})
        path = save_checkpoint(self.model, out, method_name=self.method.name, export=self.method.export,
                               record=self.record, tokenizer=self.tokenizer, source=self.source,
                               overwrite=overwrite, store=self.store)
        if self.store is not None:
            # The layer shards now live in the checkpoint; `self.model` keeps its meta-device
            # layers (loading the result is the caller's choice: `moepress.load(path)`).
            self.store.reader.close()
        stages["save"] = {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": _peak_rss_mb()}
        (path / RECORD_NAME).write_text(__import__("json").dumps(self.record, indent=2, default=str) + "\n")
        return path


def compress(model, method: str, ratio: float | None = None, *, experts: int | None = None,
             calib=None, samples: int = 128, seq_len: int | None = None, seed: int = 0,
             batch_size: int = 8, tokenizer=None, dtype: torch.dtype | None = torch.float32,
             offload: bool | str | Path = False, progress=None, **options) -> CompressionResult:
    """Compress `model` (path, hub id or model object) with registered method `method`.

    Args:
        ratio: fraction of routed-expert parameters removed (for `compressed_experts`: fraction of
            each token's activated experts replaced). `experts` keeps M experts per layer instead.
        calib: calibration source (file, folder, jsonl, saved dataset; None = built-in text).
        samples, seq_len: packed calibration sequences (seq_len default min(2048, max positions)).
        offload: bounded memory for a model given as a path: decoder layers are read from the
            checkpoint one at a time and finished layers written to a work directory (True = a
            temporary one, or the directory to use); the result's model is complete after `save`.
            Given the work directory of an interrupted run with the same settings, the finished
            layers are reused (resume).
        options: the method's own config fields.
    Returns: a `CompressionResult`; call `.save(out)`.
    """
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    method_obj = build_method(method, ratio=ratio, experts=experts, **options)
    source = str(model) if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
    t0 = time.perf_counter()
    store = None
    if offload and isinstance(model, (str, Path)):
        import tempfile

        from .streaming import open_streaming

        work = Path(tempfile.mkdtemp(prefix="moepress-work-")) if offload is True else Path(offload)
        model_obj, store = open_streaming(model, work, dtype=dtype or torch.float32)
    elif isinstance(model, (str, Path)):
        model_obj = load(model, dtype=dtype)
    else:
        model_obj = model
    family = family_of(model_obj)
    tok = _load_tokenizer(model, tokenizer)
    stages = {"load": {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": _peak_rss_mb()}}
    if seq_len is None:
        seq_len = min(2048, int(getattr(model_obj.config, "max_position_embeddings", 2048)))
    t0 = time.perf_counter()
    calibration = build_calibration(tok, calib, samples=samples, seq_len=seq_len, seed=seed)
    stages["calibration"] = {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": _peak_rss_mb()}
    if store is not None:
        stages["calibration"]["resumed_layers"] = store.resume(_run_key(source, method_obj, calibration, batch_size))
    before = parameter_counts(model_obj)
    t0 = time.perf_counter()
    records = compress_layers(model_obj, method_obj, calibration, batch_size=batch_size, progress=progress,
                              store=store)
    stages["compress"] = {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": _peak_rss_mb()}
    after = parameter_counts(model_obj)
    record = {
        "moepress_record": 1,
        "method": method_obj.name,
        "config": dataclasses.asdict(method_obj.config),
        "export": method_obj.export,
        "source_model": source,
        "family": family.model_type,
        "calibration": calibration.describe(),
        "seed": seed,
        "batch_size": batch_size,
        "propagation": "compressed",
        "layers": {str(k): v for k, v in records.items()},
        "parameters": {"before": before, "after": after},
        "versions": library_versions(),
        "stages": stages,
        "wall_seconds": round(time.perf_counter() - t_start, 3),
    }
    record["offload"] = store is not None
    return CompressionResult(model_obj, tok, method_obj, records, record, source, store)


def _run_key(source, method: Method, calibration, batch_size: int) -> str:
    """Identity of a run for resuming: same source, method, config, calibration tokens, batching."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(json.dumps([str(source), method.name, dataclasses.asdict(method.config), batch_size],
                        sort_keys=True, default=str).encode())
    h.update(calibration.input_ids.numpy().tobytes())
    return h.hexdigest()


def methods() -> dict[str, str]:
    """`{name: one-line summary}` of every registered method."""
    from .methods import available_methods

    return {name: cls.summary for name, cls in available_methods().items()}


__all__ = ["CompressionResult", "compress", "load", "methods", "read_record"]
