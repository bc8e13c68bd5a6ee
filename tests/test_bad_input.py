"""Bad input through the real CLI (issue 12): a non-zero exit, one `error:` line, no traceback, and
neither the source model nor an existing output touched."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moepress.cli import app

runner = CliRunner()


def tree_hash(path: Path) -> str:
    """Hash of every file's name, bytes and mode under `path` (or of the file itself)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
        h.update(str(p.stat().st_mode).encode())
    return h.hexdigest()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _poison(src: Path, dst: Path, value: float) -> Path:
    """A copy of `src` with one value of layer 0's first expert weight set to `value` (NaN / Inf)."""
    _copy(src, dst)
    weights = load_file(dst / "model.safetensors")
    key = next(k for k in sorted(weights) if k.startswith("model.layers.0.") and ".experts." in k)
    weights[key] = weights[key].clone()
    weights[key].view(-1)[3] = value
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _truncated(src: Path, dst: Path) -> Path:
    _copy(src, dst)
    shard = dst / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 1000)
    return dst


def _dense(tmp: Path, tokenizer) -> Path:
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "dense")
    tokenizer.save_pretrained(tmp / "dense")
    return tmp / "dense"


def _other_moe(tmp: Path, tokenizer) -> Path:
    config = transformers.GraniteMoeConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "granite")
    return tmp / "granite"


# case -> (how the source is made, extra CLI args, text the error line must contain)
CASES = {
    "not an MoE model": ("dense", [], "not a Mixture-of-Experts model"),
    "unsupported family": ("granite", [], "supports the families"),
    "missing path": ("missing", [], "does not exist"),
    "hub id offline": ("hub", [], "hub is offline"),
    "ratio above 1": ("ok", ["--ratio", "1.5"], "(0, 1)"),
    "ratio 0": ("ok", ["--ratio", "0"], "nothing to compress"),
    "negative experts": ("ok", ["--experts", "0", "--ratio", None], "--experts must be >= 1"),
    "experts below top-k": ("ok", ["--experts", "1", "--ratio", None], "top-k=2"),
    "too few calibration tokens": ("ok", ["--calib", "TINY_CALIB"], "calibration"),
    "NaN weight": ("nan", [], "NaN"),
    "Inf weight": ("inf", [], "Inf"),
    "truncated safetensors": ("truncated", [], "truncated"),
    "bad --opt value": ("ok", ["--method", "mergemoe", "--opt", "ridge=abc"], "ridge expects float"),
    "bad --opt type (bool)": ("ok", ["--opt", "renormalize=maybe"], "renormalize expects bool"),
    "unknown --opt": ("ok", ["--opt", "nope=1"], "has no option"),
    "unknown method": ("ok", ["--method", "nope"], "unknown method"),
    "bad --dtype": ("ok", ["--dtype", "int8"], "--dtype must be one of"),
    "existing output": ("ok", ["--out", "EXISTING"], "pass --overwrite"),
    "output is the source": ("ok", ["--out", "SOURCE"], "is the source model"),
    "output inside the source": ("ok", ["--out", "INSIDE_SOURCE"], "is inside the source model"),
    "missing calibration file": ("ok", ["--calib", "MISSING"], "does not exist"),
    "binary calibration file": ("ok", ["--calib", "BINARY_CALIB"], "binary.bin is not text (it holds NUL bytes"),
    "calibration file not UTF-8": ("ok", ["--calib", "LATIN1_CALIB"], "latin1.txt is not UTF-8 text"),
    "ratio not a number": ("ok", ["--ratio", "abc"], "Invalid value for '--ratio'"),
    # method x option, refused before the model or the calibration text is read
    "--quantize of compressed experts": ("ok", ["--method", "compressed_experts", "--quantize", "int8"],
                                         "cannot quantize the 'compressed_experts' blocks"),
    "--quantize of low-rank experts": ("ok", ["--method", "moe_i2", "--quantize", "fp8"], "'lowrank' blocks"),
    "--budget auto of a method keeping all experts": ("ok", ["--method", "d2moe", "--budget", "auto"],
                                                      "use --budget uniform"),
    "--layers of a whole-model budget": ("ok", ["--method", "moe_i2", "--layers", "0"], "cannot compress a subset"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_checkpoint, tokenizer):
    tmp = tmp_path_factory.mktemp("bad-sources")
    ok = tiny_checkpoint("mixtral")
    return {"ok": ok, "dense": _dense(tmp, tokenizer), "granite": _other_moe(tmp, tokenizer),
            "missing": tmp / "no-such-model", "hub": "no-such-org/no-such-model",
            "nan": _poison(ok, tmp / "nan", float("nan")), "inf": _poison(ok, tmp / "inf", float("inf")),
            "truncated": _truncated(ok, tmp / "truncated")}


def _args(source, extra: list, calib_file: Path, tmp: Path) -> list[str]:
    args = {"--method": "reap", "--ratio": "0.5", "--out": str(tmp / "out"), "--calib": str(calib_file),
            "--samples": "4", "--seq-len": "32"}
    extra = list(extra)
    opts = []
    while extra:
        key, value = extra.pop(0), extra.pop(0)
        if key == "--opt":
            opts += [key, value]
        elif value is None:
            args.pop(key)
        else:
            args[key] = value
    substitutions = {"TINY_CALIB": str(tmp / "tiny.txt"), "EXISTING": str(tmp / "existing"),
                     "BINARY_CALIB": str(tmp / "binary.bin"), "LATIN1_CALIB": str(tmp / "latin1.txt"),
                     "SOURCE": str(source), "MISSING": str(tmp / "missing.txt"),
                     "INSIDE_SOURCE": str(Path(str(source)) / "sub")}
    flat = [str(source)]
    for key, value in args.items():
        flat += [key, substitutions.get(value, value)]
    return flat + opts + ["--quiet"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_line(case, sources, calib_file, tmp_path):
    kind, extra, expected = CASES[case]
    source = sources[kind]
    (tmp_path / "tiny.txt").write_text("too short")
    (tmp_path / "binary.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve text in Latin-1. ".encode("latin-1") * 40)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("a colleague's file")
    watched = [p for p in (Path(str(source)), existing) if p.exists()]
    before = {p: tree_hash(p) for p in watched}
    res = runner.invoke(app, ["compress", *_args(source, extra, calib_file, tmp_path)])
    lines = [line for line in res.output.splitlines() if line.strip()]  # no library progress bars either
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), res.exception  # ended by the CLI, not by an exception
    assert "Traceback" not in res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert expected in lines[0], lines[0]
    assert {p: tree_hash(p) for p in watched} == before
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))
    assert not (tmp_path / ".out.work").exists()  # no layer finished: no work folder is left behind
    assert not (tmp_path / ".out.lock").exists()  # nor the output's lock


def test_argument_errors_need_no_torch():
    """`moepress --help` and argument errors answer before torch is imported (first contact is fast)."""
    import subprocess
    import sys

    code = ("import sys; from moepress.cli import app\n"
            "try: app(['compress', '/no/such/model', '-m', 'reap', '--ratio', '0', '-o', '/tmp/x'])\n"
            "except SystemExit as e: print('exit', e.code, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout.strip() == "exit 2 False", res.stdout + res.stderr
    assert "nothing to compress" in res.stderr


def test_overwriting_a_folder_that_holds_the_source_is_refused(tmp_path):
    """`--out PARENT --overwrite` would delete PARENT, and the source model inside it, at the end."""
    from moepress.checks import ExportError, check_output_dir

    source = tmp_path / "models" / "ref"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="would delete the source model"):
        check_output_dir(tmp_path / "models", source, overwrite=True)
    with pytest.raises(ExportError, match="not empty"):  # without --overwrite it was refused already
        check_output_dir(tmp_path / "models", source, overwrite=False)
    assert check_output_dir(tmp_path / "elsewhere", source, overwrite=True).path == (tmp_path / "elsewhere").resolve()


@pytest.mark.parametrize("where", ["SOURCE", "INSIDE_SOURCE"])
@pytest.mark.parametrize("command", ["quantize", "bench"])
def test_an_output_at_or_inside_the_source_is_refused_by_quantize_and_bench(command, where, tiny_checkpoint,
                                                                           tmp_path):
    src = tiny_checkpoint("mixtral")
    before = tree_hash(src)
    out = src if where == "SOURCE" else src / "sub"
    res = runner.invoke(app, [command, str(src), "--out", str(out)])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert ("is the source model" if where == "SOURCE" and command == "quantize" else "inside the source model") \
        in lines[0], lines[0]
    assert tree_hash(src) == before and not (src / "sub").exists()
    assert not list(src.parent.glob(f".{src.name}*"))  # no lock, work or partial folder beside it either


def test_a_nan_weight_is_named_as_the_checkpoint_file_stores_it(tiny_checkpoint, calib_file, tmp_path):
    """The hub layout's per-expert name and the expert, not the fused in-memory `experts.gate_up_proj`;
    and no advice to rerun, which would fail alike."""
    src = _copy(tiny_checkpoint("mixtral"), tmp_path / "src")
    weights = load_file(src / "model.safetensors")
    key = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    weights[key] = weights[key].clone()
    weights[key][5, 7] = float("nan")
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    res = runner.invoke(app, ["compress", str(src), *_args(src, [], calib_file, tmp_path)[1:]])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert f"layer 0: weight {key} (expert 3) in model.safetensors holds 1 NaN and 0 Inf values" in lines[0]
    assert "gate_up_proj" not in lines[0] and "rerun" not in lines[0]


def test_the_methods_quantize_refuses_are_those_whose_blocks_it_cannot_hold():
    """`checks.UNQUANTIZABLE_BLOCKS` (read before any import) stays in step with the block kinds."""
    from moepress.checks import UNQUANTIZABLE_BLOCKS
    from moepress.methods import available_methods
    from moepress.modeling.modeling_moepress import BLOCK_KINDS
    from moepress.modeling.moepress_quant import QUANTIZABLE

    assert set(UNQUANTIZABLE_BLOCKS.values()) == set(BLOCK_KINDS) - set(QUANTIZABLE) - {"experts"}
    assert set(UNQUANTIZABLE_BLOCKS) <= set(available_methods())
