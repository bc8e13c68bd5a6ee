"""`--replay`: a recorded run redone from its moepress.json, bit for bit (issue 20)."""

from __future__ import annotations

import json

import pytest

import moepress
from moepress.checks import InputError
from moepress import replay


def _tensor_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("method,options", [("mergemoe", {}), ("d2moe", {"rank": 8})])
def test_a_replayed_run_writes_the_same_bytes(method, options, tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("qwen3_moe")
    calib = tmp_path / "calib.txt"
    calib.write_text(calib_file.read_text())
    first = moepress.compress(src, method, 0.5, calib=calib, samples=5, seq_len=24, seed=3, batch_size=2,
                              **options).save(tmp_path / "first")
    again = replay(first / "moepress.json").save(tmp_path / "again")
    assert _tensor_files(again) == _tensor_files(first) and _tensor_files(first)
    record = json.loads((again / "moepress.json").read_text())
    assert record["replay_of"] == str((first / "moepress.json").resolve())
    assert record["calibration"] == json.loads((first / "moepress.json").read_text())["calibration"]

    calib.write_text(calib.read_text()[100:])  # the text changed since: refused, nothing written
    with pytest.raises(InputError, match="calibration tokens differ"):
        replay(first).save(tmp_path / "changed")
    assert not (tmp_path / "changed").exists()


def test_replay_refuses_another_world_size_and_a_record_that_is_not_one(tmp_path):
    (tmp_path / "moepress.json").write_text(json.dumps({"moepress_record": 1, "method": "reap", "world_size": 2,
                                                        "source_model": "x", "config": {"ratio": 0.5}}))
    with pytest.raises(InputError, match="recorded with 2 rank"):
        replay(tmp_path)
    (tmp_path / "moepress.json").write_text("{}")
    with pytest.raises(InputError, match="not a moepress.json record"):
        replay(tmp_path)


def test_the_cli_replays_a_run_and_refuses_other_arguments_with_it(tiny_checkpoint, calib_file, tmp_path):
    from typer.testing import CliRunner

    from moepress.cli import app

    src = tiny_checkpoint("mixtral")
    runner = CliRunner()
    res = runner.invoke(app, ["compress", str(src), "-m", "reap", "--ratio", "0.5", "--calib", str(calib_file),
                              "--samples", "4", "--seq-len", "24", "-o", str(tmp_path / "a"), "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compress", "--replay", str(tmp_path / "a" / "moepress.json"), "-o", str(tmp_path / "b"),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    assert "replayed" in res.output
    assert _tensor_files(tmp_path / "b") == _tensor_files(tmp_path / "a")
    res = runner.invoke(app, ["compress", "--replay", str(tmp_path / "a"), "-m", "frequency", "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "give only --out" in res.output and not (tmp_path / "c").exists()
    res = runner.invoke(app, ["compress", "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "needs MODEL and --method" in res.output
