"""The command line as users call it (docs/design.md#commands)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import transformers
from transformers import AutoTokenizer
from typer.testing import CliRunner

from moepress.arch import moe_layer_views
from moepress.calib import build_calibration
from moepress.cli import app
from moepress.methods import available_methods

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_compress_writes_a_stock_checkpoint_and_record(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("olmoe")
    before = sorted(p.name for p in src.iterdir())
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["compress", str(src), "--method", "reap", "--ratio", "0.25", "--calib", str(calib_file),
                              "--samples", "4", "--seq-len", "32", "--out", str(out), "--quiet",
                              "--opt", "renormalize=true"])
    assert res.exit_code == 0, res.output
    assert "checkpoint:" in res.output
    record = json.loads((out / "moepress.json").read_text())
    assert record["config"]["renormalize"] is True and record["config"]["ratio"] == 0.25
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 6
    assert model(torch.randint(0, 512, (1, 8))).logits.shape == (1, 8, 512)
    assert sorted(p.name for p in src.iterdir()) == before  # the source is untouched
    assert not list(tmp_path.glob(".pruned.partial-*"))  # no temporary left behind


def test_bad_input_gets_a_clear_message_and_exit_code_2(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("mixtral")
    res = runner.invoke(app, ["compress", str(src), "-m", "reap", "--ratio", "1.5", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "(0, 1)" in res.output
    res = runner.invoke(app, ["compress", str(src), "-m", "nope", "--ratio", "0.5", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown method 'nope'" in res.output
    res = runner.invoke(app, ["compress", str(src), "-m", "reap", "--ratio", "0.5", "--out", str(src)])
    assert res.exit_code == 2 and "is the source model" in res.output
    res = runner.invoke(app, ["compress", str(src), "-m", "reap", "--ratio", "0.5", "--calib", str(tmp_path / "x"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "does not exist" in " ".join(res.output.split())  # rich may wrap the line


def test_methods_lists_the_registry():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    rows = {}  # name -> output kind, from the table's first line of each method
    for line in res.output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 3 and cells[0]:
            rows[cells[0]] = cells[1]
    assert rows == {name: cls.export for name, cls in available_methods().items()}


def _routed_shares(path, input_ids) -> dict[int, torch.Tensor]:
    """Each MoE layer's share of top-k slots per expert, from its router during a plain forward."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    counts = {}

    def count(index, num_experts):
        def hook(module, args, output):
            counts[index] = torch.bincount(output[2].flatten(), minlength=num_experts).double()
        return hook

    hooks = [v.router.register_forward_hook(count(v.layer_index, v.num_experts)) for v in moe_layer_views(model)]
    with torch.no_grad():
        model(input_ids)
    for h in hooks:
        h.remove()
    return {i: c / c.sum() for i, c in counts.items()}


def test_inspect_prints_usage_and_writes_json_and_plot(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("qwen3_moe")
    res = runner.invoke(app, ["inspect", str(src), "--calib", str(calib_file), "--samples", "4", "--seq-len", "32",
                              "--json", str(tmp_path / "u.json"), "--plot", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    usage = json.loads((tmp_path / "u.json").read_text())
    expected = _routed_shares(src, build_calibration(AutoTokenizer.from_pretrained(src), calib_file, samples=4,
                                                     seq_len=32).input_ids)
    assert set(usage["layers"]) == {str(i) for i in expected} == {"0", "1"}
    for index, shares in expected.items():
        layer = usage["layers"][str(index)]
        assert layer["usage"] == pytest.approx(shares.tolist(), abs=1e-5)  # rounded to 5 decimals
        entropy = -(shares[shares > 0] * shares[shares > 0].log()).sum() / math.log(len(shares))
        assert layer["normalized_entropy"] == pytest.approx(float(entropy), abs=1e-4)
    assert (tmp_path / "plots" / "expert_usage.png").read_bytes()[:8] == PNG_SIGNATURE


def test_bench_grid_writes_table_json_and_plot(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("mixtral")
    text = tmp_path / "heldout.txt"
    text.write_text(calib_file.read_text()[:6000])
    res = runner.invoke(app, ["bench", str(src), "--methods", "frequency,reap", "--ratios", "0.25,0.5",
                              "--out", str(tmp_path / "rep"), "--calib", str(calib_file), "--samples", "4",
                              "--seq-len", "32", "--ppl", str(text), "--tasks", ""])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "rep" / "bench.json").read_text())
    assert [(r["method"], r["ratio"]) for r in rows] == [
        ("original", 0.0), ("frequency", 0.25), ("frequency", 0.5), ("reap", 0.25), ("reap", 0.5)]
    assert rows[2]["routed_params"] * 2 == rows[0]["routed_params"]
    assert "| reap | 0.50 |" in (tmp_path / "rep" / "bench.md").read_text()
    assert (tmp_path / "rep" / "bench.png").read_bytes()[:8] == PNG_SIGNATURE


def test_finetune_learns_the_vectors_of_a_compressed_experts_checkpoint(tiny_checkpoint, calib_file, tmp_path):
    import moepress

    ce = tmp_path / "ce"
    res = runner.invoke(app, ["compress", str(tiny_checkpoint("olmoe")), "-m", "compressed_experts", "--ratio", "0.5",
                              "--out", str(ce), "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "ce-ft"
    res = runner.invoke(app, ["finetune", str(ce), "--data", str(calib_file), "--steps", "3", "--batch-size", "2",
                              "--seq-len", "32", "--samples", "8", "--lr", "0.05", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "moepress.json").read_text())
    assert record["method"] == "compressed_experts" and record["finetune"]["steps"] == 3
    assert len(record["finetune"]["losses"]) == 3 and record["finetune"]["config"]["train"] == "vectors"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    tuned, original = moepress.load(out), moepress.load(ce)
    for (name, a), (_, b) in zip(tuned.named_parameters(), original.named_parameters()):
        # only the vectors and the default mini-experts (train="vectors" trains both) moved
        assert torch.equal(a, b) != ("ce_" in name or "aux_" in name), name
    res = runner.invoke(app, ["finetune", str(tiny_checkpoint("olmoe")), "--data", str(calib_file), "--steps", "1",
                              "--seq-len", "32", "--samples", "4", "--out", str(tmp_path / "x"), "--quiet"])
    assert res.exit_code == 2 and "no compressed-expert vectors" in res.output


def test_eval_reports_perplexity_and_parameters(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("qwen2_moe")
    text = tmp_path / "heldout.txt"
    text.write_text(calib_file.read_text()[:5000])
    res = runner.invoke(app, ["eval", str(src), "--ppl", str(text), "--seq-len", "32",
                              "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    assert report["metrics"]["params/total"] == sum(p.numel() for p in model.parameters())
    assert 1.0 < report["metrics"]["ppl/heldout.txt"] < 2 * 512  # a random 512-token model: near uniform
    assert "ppl/heldout.txt = " in res.output
    located = [line for line in res.output.splitlines() if re.search(r"\.py:\d+\s*$", line)]
    assert not located, res.output  # notices print plainly, not as rich logs ending in `cli.py:365`
    res = runner.invoke(app, ["eval", str(src), "--ppl", "no-such-text"])
    assert res.exit_code == 2 and "neither a file nor a built-in text" in res.output


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "moepress", "methods"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "compressed_experts" in done.stdout


def test_warnings_print_as_one_line_each_and_library_noise_is_off(tiny_checkpoint, calib_file, tmp_path):
    """MergeMoE on 32 tokens warns that its least squares is rank-deficient: one `warning:` line per
    warning, in moepress's voice (no file path or source line), and no transformers progress bar."""
    res = runner.invoke(app, ["compress", str(tiny_checkpoint("mixtral")), "-m", "mergemoe", "--ratio", "0.5",
                              "--calib", str(calib_file), "--samples", "2", "--seq-len", "16", "--no-offload",
                              "--quiet", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    warned = [line for line in lines if "rank-deficient" in line]
    assert warned and all(line.startswith("warning: mergemoe layer ") for line in warned), lines
    assert not [line for line in lines if ".py" in line or "RankDeficientWarning" in line], lines
    assert "Loading weights" not in res.output and "Writing model shards" not in res.output
    assert "checkpoint:" in res.output


def test_only_rank_0_prints(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    """Under torchrun (RANK set) a rank other than 0 prints neither the table nor the checkpoint line;
    an error it meets it prints only after leaving rank 0 time to report it first (torchrun then
    ends this rank), naming the rank."""
    import moepress.cli.errors

    monkeypatch.setattr(moepress.cli.errors, "RANK_ERROR_GRACE_S", 0.0)
    args = ["compress", str(tiny_checkpoint("mixtral")), "-m", "frequency", "--ratio", "0.5", "--calib",
            str(calib_file), "--samples", "2", "--seq-len", "16", "--quiet", "-o", str(tmp_path / "out")]
    res = runner.invoke(app, args, env={"RANK": "1"})
    assert res.exit_code == 0 and res.output == "", res.output
    res = runner.invoke(app, args, env={"RANK": "0"})
    assert res.exit_code == 2 and "pass --overwrite" in res.output
    res = runner.invoke(app, args, env={"RANK": "1"})
    assert res.exit_code == 2 and res.output.startswith("error (rank 1): output "), res.output
    assert len(res.output.splitlines()) == 1


def test_a_usage_error_is_one_line():
    res = runner.invoke(app, ["compress", "x", "-m", "reap", "--ratio", "abc", "-o", "y"], prog_name="moepress")
    assert res.exit_code == 2 and res.output.splitlines() == [
        "error: Invalid value for '--ratio': Input should be a valid number, unable to parse string as a number "
        "(see `moepress compress --help`)"], res.output
    res = runner.invoke(app, ["compress"], prog_name="moepress")
    assert res.exit_code == 2 and res.output.splitlines() == [
        "error: Missing option '--out' / '-o'. (see `moepress compress --help`)"], res.output
    res = runner.invoke(app, ["compress", "-o", "y"], prog_name="moepress")  # MODEL is optional only for --replay
    assert res.exit_code == 2 and len(res.output.splitlines()) == 1 and "needs MODEL and --method" in res.output


@pytest.mark.parametrize("method,words", [("reap", "experts removed"), ("mergemoe", "merged away"),
                                          ("moe_pruner", "set to zero"), ("d2moe", "low-rank deltas"),
                                          ("compressed_experts", "activated experts")])
def test_methods_says_what_ratio_removes_for_each_method(method, words):
    res = CliRunner().invoke(app, ["methods", method], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    ratio_row = next(line for line in res.output.splitlines() if "--ratio" in line)
    assert words in " ".join(ratio_row.split())


def test_eval_and_bench_quiet_turn_the_evaluation_bars_off(tiny_checkpoint, monkeypatch, tmp_path):
    import moepress
    import moepress.bench
    import moepress.eval

    seen = []
    real = moepress.eval.evaluate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("progress"))
        return real(*args, **kwargs)

    monkeypatch.setattr(moepress, "evaluate", spy)
    monkeypatch.setattr(moepress.eval, "evaluate", spy)
    src = str(tiny_checkpoint("mixtral"))
    for quiet in (False, True):
        res = runner.invoke(app, ["eval", src, "--ppl", "calib", "--seq-len", "32"] + ["--quiet"] * quiet)
        assert res.exit_code == 0, res.output
    assert seen == [None, False]  # None: bars when the output is a terminal
    seen.clear()
    res = runner.invoke(app, ["bench", src, "--methods", "frequency", "--ratios", "0.5", "--samples", "4",
                              "--seq-len", "32", "--ppl", "calib", "--tasks", "", "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 0, res.output
    assert seen == [False, False]  # the original and the one result
