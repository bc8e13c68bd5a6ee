"""The Python API's run decisions (docs/design.md#python-api): offloading, output location, the record, the loader."""

from __future__ import annotations

import json

import pytest
import torch

import moepress
from moepress.api import load_pretrained
from moepress.export import ExportError
from moepress.methods import ConfigError


def test_offload_auto_streams_a_model_directory_unless_the_method_needs_it_resident(tiny_checkpoint, calib_file,
                                                                                   tmp_path):
    src = tiny_checkpoint("mixtral")
    kwargs = dict(calib=calib_file, samples=4, seq_len=32)
    streamed = moepress.compress(src, "frequency", 0.5, **kwargs)
    assert streamed.record["offload"] and next(streamed.model.model.layers.parameters()).is_meta
    with pytest.raises(RuntimeError, match="live on disk"):
        streamed.model(torch.zeros(1, 4, dtype=torch.long))
    # MoE-I²'s default allocation compares every layer's experts at once: it needs the resident model
    resident = moepress.compress(src, "moe_i2", 0.5, **kwargs)
    assert not resident.record["offload"]
    with pytest.raises(ConfigError, match="needs the whole model in memory"):
        moepress.compress(src, "moe_i2", 0.5, offload=True, **kwargs)
    model, tokenizer = load_pretrained(src)
    with pytest.raises(ConfigError, match="local model directory"):
        moepress.compress(model, "frequency", 0.5, offload=True, tokenizer=tokenizer, **kwargs)


def test_output_is_checked_before_work_and_the_record_is_written_once_with_the_save_stage(tiny_checkpoint,
                                                                                          calib_file, tmp_path):
    src = tiny_checkpoint("olmoe")
    with pytest.raises(ExportError, match="is the source model"):
        moepress.compress(src, "frequency", 0.5, calib=tmp_path / "never-read.txt", out=src)
    out = tmp_path / "out"
    result = moepress.compress(src, "frequency", 0.5, calib=calib_file, samples=4, seq_len=32, out=out)
    work = tmp_path / ".out.work"
    assert work.is_dir()  # the resumable work directory beside the output
    assert result.save() == out.resolve()
    assert not work.exists()  # created for this run: gone once its shards moved into the checkpoint
    record = json.loads((out / "moepress.json").read_text())
    assert set(record["stages"]) == {"load", "calibration", "compress", "save"}
    assert record["stages"]["save"]["seconds"] >= 0 and record["stages"] == result.record["stages"]
    assert not list(tmp_path.glob(".out.partial-*"))


def test_one_loader_for_model_and_tokenizer(tiny_checkpoint):
    src = tiny_checkpoint("qwen3_moe")
    model, tokenizer = load_pretrained(src)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer("def f(): pass")["input_ids"]
    same, tok = load_pretrained(model)  # an object is returned as is; its tokenizer comes from name_or_path
    assert same is model and tok.vocab_size == tokenizer.vocab_size
    model.name_or_path = ""
    with pytest.raises(ValueError, match="pass tokenizer="):
        load_pretrained(model)
    assert load_pretrained(model, require_tokenizer=False)[1] is None
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_pretrained("no-such-org/no-such-model")


def test_progress_false_means_no_progress_and_a_bad_one_is_a_clear_error(tiny_checkpoint):
    from moepress.methods import ConfigError

    src = tiny_checkpoint("mixtral")
    seen = []
    result = moepress.compress(src, "average", 0.5, progress=False, samples=2, seq_len=16)
    assert result.record["parameters"]["after"]["routed_experts"] < result.record["parameters"]["before"]["routed_experts"]
    moepress.compress(src, "average", 0.5, progress=lambda *a: seen.append(a), samples=2, seq_len=16)
    assert seen and seen[-1][0] == seen[-1][1]
    with pytest.raises(ConfigError, match="progress must be"):
        moepress.compress(src, "average", 0.5, progress="yes", samples=2, seq_len=16)
