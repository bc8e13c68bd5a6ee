"""Layer selection (--layers) and per-layer expert budgets (--budget auto): moepress/run/plan.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import moepress
from moepress.arch import moe_layer_views
from moepress.testing import tiny_model
from moepress.checks import InputError
from moepress.run.plan import (allocate, allowed_counts, compact_ranges, default_floor, parse_layer_spec,
                                 pruned_block_output, resolve_layers)
from moepress.methods import ConfigError

TINY = dict(samples=4, seq_len=24)


def _compress(model, method, tokenizer, calib_file, **kw):
    return moepress.compress(model, method, kw.pop("ratio", 0.5), calib=calib_file, tokenizer=tokenizer, **TINY, **kw)


# ----------------------------------------------------------------------------------- SPEC
def test_spec_parsing_ranges_lists_and_errors():
    assert parse_layer_spec("12-14") == [12, 13, 14]
    assert parse_layer_spec("0,2,4") == [0, 2, 4]
    assert parse_layer_spec(" 3 , 1-2,2 ") == [1, 2, 3]
    for bad in ("", "a", "1-", "3-1", "1,,2", "-1", "1.5"):
        with pytest.raises(InputError, match="--layers"):
            parse_layer_spec(bad)
    assert compact_ranges([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"


def test_spec_naming_a_dense_or_missing_layer_lists_the_moe_layers():
    assert resolve_layers(None, [1, 2, 3]) == [1, 2, 3]
    assert resolve_layers("2-3", [1, 2, 3]) == [2, 3]
    with pytest.raises(InputError, match=r"layer\(s\) 0 are not MoE layers.*MoE layers are 1-3"):
        resolve_layers("0-1", [1, 2, 3])  # DeepSeek: layer 0 is dense
    with pytest.raises(InputError, match="4,9"):
        resolve_layers("4,9", [1, 2, 3])


def test_budget_auto_refused_for_methods_that_do_not_keep_m_experts(tokenizer, calib_file):
    with pytest.raises(ConfigError, match="--budget auto"):
        _compress(tiny_model("mixtral"), "d2moe", tokenizer, calib_file, budget="auto")
    with pytest.raises(InputError, match="--budget must be"):
        _compress(tiny_model("mixtral"), "frequency", tokenizer, calib_file, budget="greedy")
    with pytest.raises(InputError, match="--budget-floor"):
        _compress(tiny_model("mixtral"), "frequency", tokenizer, calib_file, budget="uniform", budget_floor=2)
    with pytest.raises(ConfigError, match="exceeds the uniform count"):
        _compress(tiny_model("mixtral"), "frequency", tokenizer, calib_file, budget="auto", budget_floor=5)


# ----------------------------------------------------------------------------------- --layers
@pytest.mark.parametrize("method", ["frequency", "mergemoe"])
def test_layers_leaves_the_other_layers_bit_identical(method, tokenizer, calib_file):
    model = tiny_model("deepseek_v2", num_layers=3)  # layer 0 dense, MoE layers 1-3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _compress(model, method, tokenizer, calib_file, layers="2")
    after = result.model.state_dict()
    untouched = [k for k in before if not k.startswith("model.layers.2.")]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)
    changed = [k for k in before if k.startswith("model.layers.2.mlp.") and
               (k not in after or after[k].shape != before[k].shape or not torch.equal(before[k], after[k]))]
    assert changed  # the selected layer was compressed
    assert set(result.records) == {2}
    sel = result.record["layer_selection"]
    assert sel["layers"] == [2] and sel["spec"] == "2"
    assert sel["routed_fraction_removed_selected"] == pytest.approx(0.5)
    assert sel["routed_fraction_removed_model"] == pytest.approx(0.5 / 3, abs=1e-6)
    with pytest.raises(InputError, match="MoE layers are 1-3"):
        _compress(tiny_model("deepseek_v2", num_layers=3), method, tokenizer, calib_file, layers="0-1")


# ----------------------------------------------------------------------------------- budget auto
def test_allocation_minimises_the_summed_curve_with_the_total_and_floor():
    # layer 0 loses much when cut, layer 1 little: auto gives layer 0 more, total kept
    curves = [{2: 0.9, 3: 0.5, 4: 0.2, 5: 0.1, 6: 0.0}, {2: 0.05, 3: 0.03, 4: 0.02, 5: 0.01, 6: 0.0}]
    assert allocate(curves, 8) == [6, 2]
    # a non-convex curve that greedy marginal gains would get wrong: exact DP finds the jump
    curves = [{2: 1.0, 3: 1.0, 4: 0.0}, {2: 0.3, 3: 0.0, 4: 0.0}]
    assert allocate(curves, 6) == [4, 2]
    assert default_floor(8, 2) == 2 and default_floor(64, 8) == 16 and default_floor(4, 6) == 4


def test_fast_pruned_output_equals_the_pruned_block():
    model = tiny_model("qwen3_moe")
    view = moe_layer_views(model)[0]
    x = torch.randn(40, view.hidden_size)
    keep = [0, 3, 5]
    block = view.select(keep)
    torch.testing.assert_close(pruned_block_output(view, keep, x), block(x[None])[0], atol=1e-6, rtol=1e-5)


def test_allowed_counts_follow_group_routing():
    model = tiny_model("deepseek_v3")  # n_group=2, groups scored by their top-2: even counts, >= 4
    view = moe_layer_views(model)[0]
    assert allowed_counts(view, 2) == [4, 6, 8]


@pytest.mark.parametrize("family,method", [("mixtral", "frequency"), ("qwen3_moe", "mergemoe"),
                                           ("qwen3_moe", "reap"), ("mixtral", "average")])
def test_budget_auto_counts_sum_to_uniform_total_and_reload(family, method, tokenizer, calib_file, tmp_path):
    model = tiny_model(family, num_layers=4)
    options = {"export": "stock"} if method == "average" else {}
    result = _compress(model, method, tokenizer, calib_file, budget="auto", budget_floor=2, **options)
    budget = result.record["budget"]
    counts = {int(k): v for k, v in budget["experts"].items()}
    assert budget["mode"] == "auto" and budget["floor"] == 2
    assert sum(counts.values()) == 4 * 4 and all(2 <= m <= 8 for m in counts.values())
    assert len(set(counts.values())) > 1  # random layers differ in sensitivity
    assert result.record["parameters"]["after"]["experts_per_layer"] == counts
    assert {r["experts"] for r in result.records.values()} == set(counts.values())
    curves = budget["sensitivity"]
    assert set(curves) == {str(i) for i in counts} and all(c["8"] == 0.0 for c in curves.values())
    assert budget["predicted_error"]["auto"] <= budget["predicted_error"]["uniform"] + 1e-9
    assert result.record["export"] == "custom"  # per-layer counts: no stock config expresses them
    out = result.save(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    if method in ("frequency", "reap", "average"):
        assert {int(k): v["num_experts"] for k, v in config["moepress"]["layers"].items() if v["kind"] == "experts"} \
            == {i: m for i, m in counts.items() if m != 8}
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.model(ids).logits
        got = moepress.load(out)(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "moepress.json").read_text())["budget"]["experts"] == budget["experts"]


def test_uniform_pruning_of_all_layers_stays_a_stock_checkpoint(tokenizer, calib_file, tmp_path):
    result = _compress(tiny_model("mixtral"), "frequency", tokenizer, calib_file)
    assert result.record["export"] == "stock" and result.record["budget"]["mode"] == "uniform"
    out = result.save(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 4 and "auto_map" not in config


_STANDALONE = """
import importlib.util, os, sys
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "moepress"))]
assert importlib.util.find_spec("moepress") is None
import torch, transformers
data = torch.load(sys.argv[1])
out = {}
for name, path in data["dirs"].items():
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        out[name] = model(data["ids"]).logits
torch.save(out, sys.argv[2])
"""


def test_per_layer_counts_load_with_trust_remote_code_without_moepress(tokenizer, calib_file, tmp_path):
    runs = {"prune-mixtral": ("mixtral", "frequency", dict(budget="auto", budget_floor=2)),
            "prune-qwen3-layers": ("qwen3_moe", "reap", dict(layers="1")),
            "merge-qwen3": ("qwen3_moe", "average", dict(budget="auto", budget_floor=2))}
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    dirs, expected = {}, {}
    for name, (family, method, kw) in runs.items():
        result = _compress(tiny_model(family, num_layers=3), method, tokenizer, calib_file, **kw)
        dirs[name] = str(result.save(tmp_path / name))
        with torch.no_grad():
            expected[name] = result.model(ids).logits
    torch.save({"dirs": dirs, "ids": ids}, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _STANDALONE, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for name in runs:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_offloaded_run_with_auto_budget(tiny_checkpoint, calib_file, tmp_path):
    """Bounded memory: the sensitivity pass streams layers through the store; the result reloads."""
    path = tiny_checkpoint("mixtral")
    result = moepress.compress(str(path), "frequency", 0.5, calib=calib_file, **TINY, offload=True,
                               out=tmp_path / "out", budget="auto", budget_floor=2)
    out = result.save()
    counts = {int(k): v for k, v in result.record["budget"]["experts"].items()}
    assert sum(counts.values()) == 8
    model = moepress.load(out)
    assert {v.layer_index: v.num_experts for v in moe_layer_views(model)} == counts


def test_cli_layers_and_budget(tiny_checkpoint, calib_file, tmp_path):
    from typer.testing import CliRunner

    from moepress.cli import app

    runner = CliRunner()
    src = str(tiny_checkpoint("olmoe"))
    base = ["compress", src, "-m", "frequency", "--ratio", "0.5", "--calib", str(calib_file), "--samples", "4",
            "--seq-len", "24", "--quiet"]
    res = runner.invoke(app, base + ["--out", str(tmp_path / "bad"), "--layers", "1-0"])
    assert res.exit_code == 2 and "runs backwards" in res.output
    res = runner.invoke(app, base + ["--out", str(tmp_path / "bad"), "--budget", "smart"])
    assert res.exit_code == 2 and "--budget must be one of uniform, auto" in res.output
    res = runner.invoke(app, base + ["--out", str(tmp_path / "bad"), "--layers", "7"])
    assert res.exit_code == 2 and "its MoE layers are 0-1" in " ".join(res.output.split())
    out = tmp_path / "o"
    res = runner.invoke(app, base + ["--out", str(out), "--layers", "1", "--budget", "uniform"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "moepress.json").read_text())
    assert record["layer_selection"]["layers"] == [1] and record["budget"]["experts"] == {"1": 4}
    assert record["export"] == "custom" and record["parameters"]["after"]["experts_per_layer"] == {"0": 8, "1": 4}
    model = moepress.load(out)
    assert [v.num_experts for v in moe_layer_views(model)] == [8, 4]


def test_layers_with_auto_budget_spread_only_over_the_selected_layers(tokenizer, calib_file):
    model = tiny_model("olmoe", num_layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _compress(model, "reap", tokenizer, calib_file, layers="1-2", budget="auto", budget_floor=2)
    counts = {int(k): v for k, v in result.record["budget"]["experts"].items()}
    assert set(counts) == {1, 2} and sum(counts.values()) == 8
    assert set(result.record["budget"]["sensitivity"]) == {"1", "2"}
    after = result.model.state_dict()
    for k in before:
        if k.startswith(("model.layers.0.", "model.layers.3.")):
            assert torch.equal(before[k], after[k]), k
    assert result.record["parameters"]["after"]["experts_per_layer"] == {0: 8, 1: counts[1], 2: counts[2], 3: 8}
