"""The statistics cache (moepress/run/cache.py, cache_keys.py) and `propagate="original"` (issue 11 item 1)."""

from __future__ import annotations

import json

import pytest
import torch

import moepress
from moepress.run import pipeline
from moepress.api import load_pretrained
from moepress.arch import decoder_layers, layer_view, moe_layer_indices
from moepress.calib import LayerStatistics, build_calibration
from moepress.methods import ConfigError
from moepress.run.cache import MISSING, StatsCache

KW = dict(samples=4, seq_len=32, offload=False)


def _weights(result):
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_run_hits_everything_and_gives_bit_identical_weights(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("mixtral")
    cache = tmp_path / "cache"
    plain = moepress.compress(src, "reap", 0.5, calib=calib_file, stats_cache=False, **KW)
    first = moepress.compress(src, "reap", 0.5, calib=calib_file, stats_cache=cache, **KW)
    second = moepress.compress(src, "reap", 0.5, calib=calib_file, stats_cache=cache, **KW)
    moe = len(moe_layer_indices(first.model))
    assert first.record["stats_cache"]["misses"] == moe and first.record["stats_cache"]["stored"] == moe
    assert second.record["stats_cache"]["hits"] == moe and second.record["stats_cache"]["misses"] == 0
    assert second.record["propagation"] == "compressed" and plain.record["stats_cache"] is None
    assert _same(_weights(first), _weights(second)) and _same(_weights(plain), _weights(second))
    assert all(second.records[i]["kept"] == plain.records[i]["kept"] for i in plain.records)


def test_changed_weights_or_calibration_invalidate(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("mixtral")
    cache = tmp_path / "cache"
    kwargs = dict(calib=calib_file, stats_cache=cache, propagate="original", **KW)
    moepress.compress(src, "frequency", 0.5, **kwargs)
    # other calibration tokens (another sample of the same text): every layer misses
    other = moepress.compress(src, "frequency", 0.5, seed=1, **kwargs)
    assert other.record["stats_cache"]["hits"] == 0 and other.record["stats_cache"]["misses"] == 2
    # one weight of layer 1 changed: layer 0 still matches, layer 1 does not
    model, tok = load_pretrained(src)
    with torch.no_grad():
        decoder_layers(model)[1].self_attn.q_proj.weight[0, 0] += 1e-3
    changed = moepress.compress(model, "frequency", 0.5, tokenizer=tok, **kwargs)
    assert changed.record["stats_cache"]["hits"] == 1 and changed.record["stats_cache"]["misses"] == 1
    # an embedding changed: the inputs of every layer differ
    model, tok = load_pretrained(src)
    with torch.no_grad():
        model.get_input_embeddings().weight[5, 0] += 1e-3
    changed = moepress.compress(model, "frequency", 0.5, tokenizer=tok, **kwargs)
    assert changed.record["stats_cache"]["hits"] == 0
    # the same model again: all hit
    again = moepress.compress(src, "frequency", 0.5, **kwargs)
    assert again.record["stats_cache"] == {**again.record["stats_cache"], "hits": 2, "misses": 0}


def _uncompressed_frequency(src, calib_file, index):
    model, tok = load_pretrained(src)
    calibration = build_calibration(tok, calib_file, samples=4, seq_len=32, seed=0)
    hidden, kwargs = pipeline.capture_layer_inputs(model, calibration, 8)
    for i in range(index):
        hidden = pipeline.run_layer(decoder_layers(model)[i], i, hidden, kwargs)
    view = layer_view(model, index)
    inputs = pipeline.collect_block_inputs(decoder_layers(model)[index], view.block, index, hidden, kwargs)
    return LayerStatistics(view, inputs)["frequency"]


def test_original_propagation_gives_the_uncompressed_models_statistics(tiny_checkpoint, calib_file):
    src = tiny_checkpoint("mixtral")
    reference = [round(float(s), 6) for s in _uncompressed_frequency(src, calib_file, 1)]
    original = moepress.compress(src, "frequency", 0.5, calib=calib_file, propagate="original", stats_cache=False,
                                 **KW)
    compressed = moepress.compress(src, "frequency", 0.5, calib=calib_file, stats_cache=False, **KW)
    assert original.records[1]["scores"] == reference
    assert compressed.records[1]["scores"] != reference  # sequential propagation sees the pruned layer 0
    assert original.record["propagation"] == "original"


def test_a_second_ratio_runs_no_calibration_forward(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    src = tiny_checkpoint("mixtral")
    kwargs = dict(calib=calib_file, stats_cache=tmp_path / "cache", propagate="original", **KW)
    first = moepress.compress(src, "reap", 0.25, **kwargs)
    assert first.record["stats_cache"]["inputs_propagated"]
    reference = moepress.compress(src, "reap", 0.5, calib=calib_file, propagate="original", stats_cache=False, **KW)

    def forbidden(*args, **kw):
        raise AssertionError("a calibration forward ran although every statistic was cached")

    for name in ("capture_layer_inputs", "run_layer", "collect_block_inputs", "run_layer_collecting"):
        monkeypatch.setattr(pipeline, name, forbidden)
    second = moepress.compress(src, "reap", 0.5, **kwargs)
    assert second.record["stats_cache"] == {**second.record["stats_cache"], "hits": 2, "misses": 0,
                                            "inputs_propagated": False}
    assert _same(_weights(second), _weights(reference))
    assert [r["tokens"] for r in second.records.values()] == [r["tokens"] for r in reference.records.values()]
    # a method reading the layer inputs itself (MergeMoE's least squares) still propagates them
    with pytest.raises(AssertionError, match="calibration forward"):
        moepress.compress(src, "mergemoe", 0.5, **kwargs)


def test_disabled_cache_writes_nothing_and_the_default_uses_the_env_directory(tiny_checkpoint, calib_file, tmp_path,
                                                                             monkeypatch):
    src = tiny_checkpoint("olmoe")
    monkeypatch.setenv("MOEPRESS_STATS_CACHE", str(tmp_path / "env-cache"))
    off = moepress.compress(src, "frequency", 0.5, calib=calib_file, stats_cache=False, **KW)
    assert off.record["stats_cache"] is None and not (tmp_path / "env-cache").exists()
    on = moepress.compress(src, "frequency", 0.5, calib=calib_file, out=tmp_path / "out", **KW)
    on.save()
    record = json.loads((tmp_path / "out" / "moepress.json").read_text())
    assert record["stats_cache"]["dir"] == str(tmp_path / "env-cache") and record["stats_cache"]["stored"] >= 1
    assert list((tmp_path / "env-cache").glob("??/*.pt"))
    with pytest.raises(ConfigError, match="propagate"):
        moepress.compress(src, "frequency", 0.5, calib=calib_file, propagate="sideways", **KW)


def test_size_cap_evicts_least_recently_used_and_refuses_oversized_entries(tmp_path):
    said = []
    cache = StatsCache(tmp_path, max_bytes=5000, log=said.append)
    small = torch.zeros(100, dtype=torch.float32)  # ~2 kB on disk with torch.save's framing: two fit, not three
    assert cache.put("aa01", small) and cache.put("aa02", small + 1)
    import os
    import time

    os.utime(cache._path("aa01"), (time.time() - 100, time.time() - 100))
    assert torch.equal(cache.get("aa02"), small + 1)
    assert cache.put("aa03", small + 2)  # over the cap: the least recently used (aa01) goes
    assert not cache.contains("aa01") and cache.contains("aa02") and cache.contains("aa03")
    assert not cache.put("aa04", torch.zeros(10_000)) and not cache.put("aa05", torch.zeros(10_000))
    assert len(said) == 1 and "exceeds the cap" in said[0]
    assert cache.get("nope") is MISSING
    assert cache.describe() == {"dir": str(tmp_path), "hits": 1, "misses": 1, "stored": 3}
    assert not list(tmp_path.glob(".tmp-*"))  # failed or refused writes leave no temporary file
    (tmp_path / "a-file").write_text("")
    unwritable = StatsCache(tmp_path / "a-file", log=said.append)  # not a directory: cannot be written
    assert not unwritable.put("bb01", small) and not unwritable.put("bb02", small)
    assert len(said) == 2 and "cannot write" in said[1]


def test_cli_options(tiny_checkpoint, calib_file, tmp_path):
    from typer.testing import CliRunner

    from moepress.cli import app

    src = tiny_checkpoint("mixtral")
    runner = CliRunner()
    base = ["compress", str(src), "-m", "frequency", "--ratio", "0.5", "--calib", str(calib_file), "--samples", "4",
            "--seq-len", "32", "--no-offload", "-q"]
    res = runner.invoke(app, base + ["--out", str(tmp_path / "a"), "--stats-cache", str(tmp_path / "c"),
                                     "--propagate", "original"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "a" / "moepress.json").read_text())
    assert record["propagation"] == "original" and record["stats_cache"]["dir"] == str(tmp_path / "c")
    res = runner.invoke(app, base + ["--out", str(tmp_path / "b"), "--no-stats-cache"])
    assert res.exit_code == 0 and json.loads((tmp_path / "b" / "moepress.json").read_text())["stats_cache"] is None
    res = runner.invoke(app, base + ["--out", str(tmp_path / "d"), "--propagate", "sideways"])
    assert res.exit_code == 2 and "--propagate" in res.output


def test_d2moe_reuses_its_fisher_and_grams(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    from moepress.methods.d2moe import method as d2moe_method

    src = tiny_checkpoint("mixtral")
    kwargs = dict(calib=calib_file, stats_cache=tmp_path / "cache", propagate="original", **KW)
    reference = moepress.compress(src, "d2moe", 0.5, calib=calib_file, propagate="original", stats_cache=False, **KW)
    first = moepress.compress(src, "d2moe", 0.5, **kwargs)
    assert first.record["stats_cache"]["misses"] == 3 * 2  # frequency + expert_gram + Fisher, 2 MoE layers

    def forbidden(*args, **kw):
        raise AssertionError("Fisher recomputed although cached")

    monkeypatch.setattr(d2moe_method, "fisher_bases", forbidden)
    monkeypatch.setattr(pipeline, "capture_layer_inputs", forbidden)
    second = moepress.compress(src, "d2moe", 0.5, **kwargs)
    assert second.record["stats_cache"]["misses"] == 0 and not second.record["stats_cache"]["inputs_propagated"]
    assert _same(_weights(second), _weights(reference)) and _same(_weights(first), _weights(reference))


class _Killed(Exception):
    pass


def test_original_propagation_streams_and_resumes_through_the_source_layers(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("mixtral")
    common = dict(calib=calib_file, samples=4, seq_len=32, propagate="original", stats_cache=tmp_path / "cache")
    reference = moepress.compress(src, "mergemoe", 0.5, offload=False, **{**common, "stats_cache": False})
    # the cache also holds statistics of layers fed by the COMPRESSED layer 0: never to be taken for ours
    sequential = moepress.compress(src, "mergemoe", 0.5, offload=False, **{**common, "propagate": "compressed"})
    assert sequential.records[1]["groups"] != reference.records[1]["groups"]

    def kill_after_first_layer(done, total, text):
        if done == 1:
            raise _Killed

    kwargs = dict(offload=tmp_path / "work", **common)
    with pytest.raises(_Killed):
        moepress.compress(src, "mergemoe", 0.5, progress=kill_after_first_layer, **kwargs)
    resumed = moepress.compress(src, "mergemoe", 0.5, **kwargs)
    assert resumed.records[0].get("resumed") and not resumed.records[1].get("resumed")
    # layer 1 saw the hidden states of the SOURCE layer 0, as in the resident run
    assert resumed.records[1]["groups"] == reference.records[1]["groups"]
    assert resumed.records[1]["calib_rel_error"] == pytest.approx(reference.records[1]["calib_rel_error"], rel=1e-4)
    out = resumed.save(tmp_path / "out")
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        diff = (moepress.load(out)(ids).logits - reference.model(ids).logits).abs().max().item()
    assert diff <= 1e-5
    # the resume key includes the propagation: a compressed-propagation run does not adopt these shards
    other = moepress.compress(src, "mergemoe", 0.5, **{**kwargs, "propagate": "compressed"})
    assert other.record["stages"]["calibration"]["resumed_layers"] == 0


def test_two_ranks_share_the_cache_and_skip_propagation(tiny_checkpoint, calib_file, tmp_path):
    """torchrun, 2 gloo ranks: rank 0 decides and writes, both read; the second run (D²-MoE: Grams,
    frequencies and Fisher all cached) propagates nothing and equals one process without cache."""
    import textwrap

    from test_data_parallel import SETTINGS, _assert_same_weights, _torchrun

    src = tiny_checkpoint("mixtral")
    kwargs = dict(calib=str(calib_file), offload=False, propagate="original", fisher_samples=4, **SETTINGS)
    script = tmp_path / "twice.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import moepress
        from moepress.run import pipeline
        kwargs = dict(stats_cache=sys.argv[2], **{kwargs!r})
        moepress.compress({str(src)!r}, "d2moe", 0.5, **kwargs)
        def forbidden(*args, **kw):
            raise AssertionError("a calibration forward ran although every statistic was cached")
        pipeline.capture_layer_inputs = forbidden
        moepress.compress({str(src)!r}, "d2moe", 0.5, **kwargs).save(sys.argv[1])
    """))
    proc = _torchrun([str(script), str(tmp_path / "parallel"), str(tmp_path / "cache")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "parallel" / "moepress.json").read_text())
    assert record["world_size"] == 2 and record["propagation"] == "original"
    assert record["stats_cache"]["misses"] == 0 and not record["stats_cache"]["inputs_propagated"]
    single = moepress.compress(str(src), "d2moe", 0.5, stats_cache=False, **kwargs).save(tmp_path / "single")
    _assert_same_weights(single, tmp_path / "parallel")


def test_bench_passes_the_cache_and_propagation_to_every_run(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moepress.run import cache as stats_cache
    from moepress.cli import app

    src = tiny_checkpoint("mixtral")
    text = tmp_path / "heldout.txt"
    text.write_text(calib_file.read_text()[:3000])
    counts = {"hits": 0}
    get = stats_cache.StatsCache.get

    def counting_get(self, key, device=None):
        value = get(self, key, device)
        counts["hits"] += value is not stats_cache.MISSING
        return value

    monkeypatch.setattr(stats_cache.StatsCache, "get", counting_get)
    res = CliRunner().invoke(app, ["bench", str(src), "--methods", "frequency", "--ratios", "0.25,0.5",
                                   "--out", str(tmp_path / "rep"), "--calib", str(calib_file), "--samples", "4",
                                   "--seq-len", "32", "--ppl", str(text), "--tasks", "", "--propagate", "original",
                                   "--stats-cache", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "c").glob("??/*.pt"))) == 2  # one frequency per MoE layer, for both ratios
    assert counts["hits"] == 2  # the second ratio read both


def test_the_code_version_ignores_comments_and_docstrings_but_not_code(tmp_path):
    from moepress.run.cache_keys import _file_digest

    def digest(name, text):
        path = tmp_path / name
        path.write_text(text)
        return _file_digest(str(path))

    base = digest("a.py", 'def f(x):\n    """Doc."""\n    return x + 1\n')
    assert digest("b.py", 'def f(x):  # a comment\n    """Another doc."""\n\n    return x + 1\n') == base
    assert digest("c.py", 'def f(x):\n    return x + 1\n') == base
    assert digest("d.py", 'def f(x):\n    """Doc."""\n    return x + 2\n') != base
