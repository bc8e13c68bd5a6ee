"""Calibration sources, packing and the layer-wise pipeline's capture."""

from __future__ import annotations

import json

import pytest
import torch

from moepress.arch import decoder_layers
from moepress.testing import tiny_model
from moepress.calib import CalibrationError, build_calibration, load_texts, pack_token_ids
from moepress.run.walk import capture_layer_inputs, run_layer


def test_sources_text_jsonl_folder_and_saved_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    assert load_texts(tmp_path / "a.txt") == ["first document"]
    assert load_texts(tmp_path / "b.jsonl") == ["second", "third"]
    assert load_texts(tmp_path) == ["first document", "second", "third"]
    datasets = pytest.importorskip("datasets")  # the [data] extra; installed by `make test`
    datasets.Dataset.from_dict({"text": ["x y", "z"]}).save_to_disk(tmp_path / "ds")
    assert load_texts(tmp_path / "ds") == ["x y", "z"]


def test_bad_sources_say_what_is_wrong(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2: expected an object with a 'text' field"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .txt"):
        load_texts(tmp_path / "empty")


def test_packing_has_no_padding_and_eos_between_documents():
    packed = pack_token_ids([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], seq_len=4, eos_id=0)
    assert packed.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]  # tail [0] dropped, never padded


def test_build_calibration_is_deterministic_and_errors_when_too_short(tokenizer, calib_file, tmp_path):
    a = build_calibration(tokenizer, calib_file, samples=5, seq_len=32, seed=3)
    b = build_calibration(tokenizer, calib_file, samples=5, seq_len=32, seed=3)
    c = build_calibration(tokenizer, calib_file, samples=5, seq_len=32, seed=4)
    assert a.input_ids.shape == (5, 32) and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(CalibrationError, match="fewer than one sequence of --seq-len 512"):
        build_calibration(tokenizer, tmp_path / "short.txt", seq_len=512)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_layerwise_propagation_reproduces_the_full_forward(family, tokenizer, calib_file):
    """Capturing layer-0 inputs and running layers one by one gives the model's own final hidden states."""
    model = tiny_model(family)
    calib = build_calibration(tokenizer, calib_file, samples=5, seq_len=16)
    hidden, kwargs = capture_layer_inputs(model, calib, batch_size=2)
    assert [h.shape[0] for h in hidden] == [2, 2, 1]
    for i, layer in enumerate(decoder_layers(model)):
        hidden = run_layer(layer, i, hidden, kwargs)
    with torch.no_grad():
        ref = model.model(calib.input_ids, output_hidden_states=True).hidden_states[-1]
        ours = model.model.norm(torch.cat(hidden))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert "forward" not in decoder_layers(model)[0].__dict__  # recorders removed


def test_layer_routing_is_computed_once_whatever_reads_it(tokenizer, calib_file):
    """Statistics and fits share one router pass per batch (the cached "routing" statistic)."""
    from moepress.arch import moe_layer_views
    from moepress.calib import LayerStatistics

    view = moe_layer_views(tiny_model("mixtral"))[0]
    batches = [torch.randn(7, view.hidden_size), torch.randn(5, view.hidden_size)]
    calls = []
    route = view.route
    view.route = lambda x: calls.append(x.shape[0]) or route(x)
    stats = LayerStatistics(view, batches)
    frequency, weights = stats["frequency"], stats["routing_weight_sum"]
    again = [r.index for _, r in stats.routed()] + [r.index for _, r in stats.routed()]
    assert calls == [7, 5]
    assert frequency.sum() == 12 * view.top_k and weights.sum() > 0
    assert torch.equal(again[0], route(batches[0]).index) and torch.equal(again[2], again[0])


def test_sampled_sequences_are_the_model_s_own_and_reproducible():
    from moepress.calib.generated import sample_sequences

    model = tiny_model("qwen3_moe").eval()
    config = model.config
    with pytest.raises(CalibrationError, match="BOS or EOS"):
        sample_sequences(model, None, 1, 4)
    config.bos_token_id = 1
    a = sample_sequences(model, None, 3, 12, seed=5, batch_size=2)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert (a[:, 0] == 1).all() and int(a.max()) < config.vocab_size
    assert torch.equal(a, sample_sequences(model, None, 3, 12, seed=5, batch_size=3))  # batching does not matter
    assert not torch.equal(a, sample_sequences(model, None, 3, 12, seed=6))
    # the samples follow the model: with all but one logit pushed down, only that token is drawn
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.full((config.vocab_size,), -1e4))
        model.lm_head.bias[7] = 0.0
    assert (sample_sequences(model, None, 2, 6, seed=0)[:, 1:] == 7).all()
    with pytest.raises(CalibrationError, match="sequences >= 1"):
        sample_sequences(model, None, 0, 12)


def test_compress_with_sampled_calibration_records_and_replays_it(tiny_checkpoint, calib_file, tmp_path):
    import moepress
    from moepress.checks import InputError

    src = tiny_checkpoint("mixtral")
    first = moepress.compress(src, "reap", 0.5, calib=calib_file, samples=4, seq_len=16, calib_generated=3)
    described = first.record["calibration"]
    assert described["generated"] == 3 and described["sequences"] == 4 + 3 and described["source"] == str(calib_file)
    assert first.record["job"]["calibration"]["generated"] == 3
    plain = moepress.compress(src, "reap", 0.5, calib=calib_file, samples=4, seq_len=16)
    assert plain.record["calibration"]["generated"] == 0
    assert plain.record["calibration"]["token_sha256"] != described["token_sha256"]
    path = first.save(tmp_path / "first")
    again = moepress.replay(path)
    assert again.record["calibration"] == described  # the same text rows and the same sampled rows
    with pytest.raises(InputError, match="calib-generated"):
        moepress.compress(src, "reap", 0.5, calib=calib_file, calib_generated=-1)


def test_the_cli_takes_calib_generated(tiny_checkpoint, calib_file, tmp_path):
    from typer.testing import CliRunner

    from moepress.cli import app

    res = CliRunner().invoke(app, ["compress", str(tiny_checkpoint("olmoe")), "-m", "frequency", "--ratio", "0.5",
                                   "--calib", str(calib_file), "--samples", "2", "--seq-len", "16",
                                   "--calib-generated", "2", "--quiet", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "out" / "moepress.json").read_text())
    assert record["calibration"]["generated"] == 2 and record["calibration"]["sequences"] == 4
    res = CliRunner().invoke(app, ["compress", str(tiny_checkpoint("olmoe")), "-m", "frequency", "--ratio", "0.5",
                                   "--calib-generated", "-1", "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--calib-generated must be" in res.output and not (tmp_path / "bad").exists()
