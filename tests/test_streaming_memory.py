"""Memory savings of a streamed (offloaded) run at half precision change no result.

A bfloat16 checkpoint streamed layer by layer holds its input embeddings as stored (lookups cast to
float32) and its head in the output dtype; the compressed checkpoint must equal the resident run's,
tensor for tensor, for a pruning method and for D²-MoE (whose Fisher runs the head)."""

from __future__ import annotations

import json

import pytest
import torch

import moepress
from moepress.testing import tiny_config
from moepress.testing.synthetic import write_synthetic_checkpoint


def _tensors(directory):
    """The checkpoint as loaded (the resident save writes per-expert keys, the streamed one fused keys)."""
    return moepress.load(directory, dtype="auto").state_dict()


@pytest.mark.parametrize("method", ["reap", "d2moe"])
def test_streamed_bfloat16_run_equals_resident_run(method, tokenizer, calib_file, tmp_path):
    src = tmp_path / "src"
    config = tiny_config("qwen3_moe", num_layers=2)
    write_synthetic_checkpoint(config, src, dtype=torch.bfloat16, std=0.1, seed=1)
    tokenizer.save_pretrained(src)
    kwargs = dict(calib=calib_file, samples=4, seq_len=32)
    resident = moepress.compress(str(src), method, 0.5, offload=False, **kwargs).save(tmp_path / "resident")
    streamed_result = moepress.compress(str(src), method, 0.5, offload=tmp_path / "work", **kwargs)
    assert streamed_result.record["offload"] is True
    assert streamed_result.model.get_input_embeddings().weight.dtype == torch.bfloat16  # held as stored
    streamed = streamed_result.save(tmp_path / "streamed")
    records = [json.loads((d / "moepress.json").read_text())["layers"] for d in (resident, streamed)]
    for key, layer in records[0].items():  # the statistics too (REAP's scores; pruned weights alone hide them)
        if "scores" in layer:
            assert layer["scores"] == records[1][key]["scores"]
    a, b = _tensors(resident), _tensors(streamed)
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.bfloat16 or not a[key].is_floating_point(), key
        assert torch.equal(a[key], b[key]), key


def test_a_layers_input_states_are_freed_once_it_has_propagated(tokenizer, calib_file, monkeypatch):
    """The loop holds one set of calibration hidden states at a time: the states captured at layer 0's
    input are gone once layer 0 has produced layer 1's (a reference kept by the setup would double
    the peak at real widths)."""
    import gc
    import weakref

    from moepress.calib import build_calibration
    from moepress.methods import build_method
    from moepress.run import pipeline
    from moepress.testing import tiny_model

    model = tiny_model("mixtral", num_layers=3)
    calibration = build_calibration(tokenizer, str(calib_file), samples=4, seq_len=16, seed=0)
    captured = []
    capture = pipeline.capture_layer_inputs

    def capture_and_watch(*args, **kwargs):
        hidden, layer_kwargs = capture(*args, **kwargs)
        captured.extend(weakref.ref(h) for h in hidden)
        return hidden, layer_kwargs

    monkeypatch.setattr(pipeline, "capture_layer_inputs", capture_and_watch)
    alive = {}

    def progress(done, total, text):
        gc.collect()
        alive[done] = sum(ref() is not None for ref in captured)

    pipeline.compress_layers(model, build_method("frequency", ratio=0.5), calibration, batch_size=2, progress=progress)
    assert captured and alive[1] == 0, alive
