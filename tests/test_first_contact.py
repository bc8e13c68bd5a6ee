"""What a new user meets first (issue 12): option help, readable tables, strict JSON, resume notices."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moepress.cli import app
from moepress.eval.report import EvalReport
from moepress.methods import ConfigError, available_methods, coerce_option
from moepress.record import strict_json

runner = CliRunner()


@pytest.mark.parametrize("method", list(available_methods()))
def test_methods_name_shows_every_option_with_type_default_and_help(method):
    res = runner.invoke(app, ["methods", method], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    rows = {}
    for line in res.output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 4 and cells[0]:
            rows[cells[0].removeprefix("--opt ").removeprefix("--").rstrip("=")] = cells[1:]
    fields = dataclasses.fields(available_methods()[method].config_class)
    assert set(rows) == {f.name for f in fields}
    for f in fields:
        type_text, default, help_text = rows[f.name]
        assert type_text and help_text, f"{method}: option {f.name} has no type or no help"
        if f.default is not dataclasses.MISSING:
            assert default == repr(f.default)


def test_options_are_typed_not_cast():
    config = available_methods()["mergemoe"].config_class
    assert coerce_option(config, "ridge", 1) == 1.0 and isinstance(coerce_option(config, "ridge", 1), float)
    with pytest.raises(ConfigError, match="ridge expects float"):
        coerce_option(config, "ridge", "abc")
    with pytest.raises(ConfigError, match="expects float"):
        coerce_option(config, "ridge", True)
    assert coerce_option(config, "experts", "none") is None


def test_records_are_strict_json():
    text = strict_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    assert json.loads(text, parse_constant=refuse) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_eval_table_names_its_columns_and_explains_them():
    base = EvalReport("orig", metrics={"ppl/heldout:a": 4.0, "ppl/heldout:b": 9.0, "next_chunk/acc": 0.5})
    report = EvalReport("comp", metrics={"ppl/heldout:a": 8.0, "ppl/heldout:b": 18.0, "next_chunk/acc": 0.25},
                        baseline=base)
    text = str(report)
    assert "compressed" in text and "original (orig)" in text and "retained %" in text
    flat = " ".join(text.split())  # the caption wraps
    assert "lower is better" in flat and "how much of the original's quality is kept" in flat
    geo = next(line for line in text.splitlines() if "ppl/geo-mean" in line)
    assert "12" in geo and "6" in geo and "50.0" in geo  # sqrt(8*18)=12 vs sqrt(4*9)=6: half retained


def test_failed_run_says_what_it_left_and_the_rerun_says_it_resumed(tiny_checkpoint, calib_file, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("mixtral"), src)
    weights = load_file(src / "model.safetensors")
    key = next(k for k in sorted(weights) if k.startswith("model.layers.1.") and ".experts." in k)
    good = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    args = ["compress", str(src), "-m", "reap", "--ratio", "0.5", "--calib", str(calib_file), "--samples", "4",
            "--seq-len", "32", "-o", str(tmp_path / "out"), "--quiet"]

    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "layer 1: weight" in res.output and "NaN" in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1, res.output
    assert "finished layers of this run are kept in" in res.output and ".out.work" in res.output
    # the same command fails the same way until the source is repaired: it says so, not "rerun"
    assert "once the source model is repaired, the same command resumes" in res.output
    assert "rerun" not in res.output
    assert (tmp_path / ".out.work" / "layer-00000.safetensors").exists()

    weights[key] = good
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "resumed: 1 finished layer(s)" in res.output
    record = json.loads((tmp_path / "out" / "moepress.json").read_text())
    assert record["layers"]["0"]["resumed"] is True and not (tmp_path / ".out.work").exists()
