"""The files shipped inside the package: small texts and the committed reference model.

``assets/texts/calib.txt`` (mixed-domain calibration text from the calib split) and
``assets/texts/heldout/<domain>.txt`` (from the held-out splits and the held-out source) let
the demo and the tests run without apt. ``assets/mixtral-ref/`` holds the committed model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .corpus import DOMAINS, TRAIN_DOMAINS, read_split
from ..resources import TEXTS_DIR
from .paths import ASSETS_DIR

DOC_SEPARATOR = "\n\n"


def _take(domain: str, split: str, max_chars: int) -> str:
    """Whole paragraphs of the split's documents (in their stored, hash-sorted order) up to ``max_chars``."""
    parts: list[str] = []
    used = 0
    for doc in read_split(domain, split):
        for para in doc["text"].split("\n\n") if domain != "code" else [doc["text"]]:
            if used + len(para) > max_chars:
                if used > 0.8 * max_chars or domain == "code":
                    return DOC_SEPARATOR.join(parts)
                continue
            parts.append(para)
            used += len(para) + len(DOC_SEPARATOR)
    return DOC_SEPARATOR.join(parts)


def export_builtin_texts(out: Path = TEXTS_DIR, heldout_chars: int = 80_000, calib_chars: int = 200_000) -> dict:
    """Write the shipped calib/heldout texts from the built corpus; returns their sizes."""
    sizes = {}
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    per_domain = calib_chars // len(TRAIN_DOMAINS)
    # Interleave domains paragraph-block-wise so any prefix of calib.txt is mixed.
    blocks = {d: _take(d, "calib", per_domain).split(DOC_SEPARATOR) for d in TRAIN_DOMAINS}
    mixed: list[str] = []
    while any(blocks.values()):
        for domain in TRAIN_DOMAINS:
            if blocks[domain]:
                mixed.append(blocks[domain].pop(0))
    (out / "calib.txt").write_text(DOC_SEPARATOR.join(mixed) + "\n")
    sizes["calib"] = (out / "calib.txt").stat().st_size
    for domain in DOMAINS:
        text = _take(domain, "heldout", heldout_chars)
        (out / "heldout" / f"{domain}.txt").write_text(text + "\n")
        sizes[f"heldout:{domain}"] = (out / "heldout" / f"{domain}.txt").stat().st_size
    return sizes


def export_asset(model_path: Path, out: Path, dtype: str = "float16") -> Path:
    """Copy a trained model into the package assets with fp16 weights.

    The config says what the file holds (``dtype: float16``), so `dtype auto` and a stock
    ``from_pretrained`` agree with the bytes on disk; moepress's loader upcasts to float32 for
    evaluation and calibration anyway (fp16 matmuls on CPU are slow and lossy).
    """
    import torch
    from safetensors.torch import load_file, save_file

    model_path, out = Path(model_path), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(model_path / "model.safetensors"))
    target = getattr(torch, dtype)
    half = {k: (v.to(target) if v.is_floating_point() and "e_score_correction_bias" not in k else v).contiguous()
            for k, v in state.items()}
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "train_log.json"):
        if (model_path / name).exists():
            shutil.copy2(model_path / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
