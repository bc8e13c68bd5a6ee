"""Weight-only quantization of routed experts (`--quantize`, `moepress quantize`; quantization.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open
from typer.testing import CliRunner

import moepress
from moepress.arch import decoder_layers, parameter_counts
from moepress.testing import tiny_model
from moepress.checks import InputError
from moepress.cli import app
from moepress.modeling.moepress_quant import SCHEMES, QuantizedWeight, dequantize
from moepress.quantization import quantize_experts, quantize_tensor

runner = CliRunner()
IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
# Relative Frobenius error of the logits of a tiny random model (2 layers) against the unquantized
# model. int8: every weight is off by at most scale/2 = max|row|/255, about 0.3% of a row's rms for
# rows of 32-64 Gaussian values, compounded over gate/up, down and two layers, measured 1.4-2.3%.
# fp8 (e4m3, 3 mantissa bits): up to 1/16 relative per weight, measured 7-10%.
# The bounds leave ~2x margin; a wrong scale or layout gives errors of order 100%.
LOGIT_BOUND = {"int8": 0.05, "fp8": 0.20}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _compress(family, method, calib_file, tokenizer, **kw):
    return moepress.compress(tiny_model(family), method, 0.5, calib=calib_file, samples=8, seq_len=24,
                             tokenizer=tokenizer, **kw)


def _stored_dtypes(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_quantized_tensor_is_within_half_a_step_per_output_channel(layout):
    w = torch.randn(4, 24, 16) * torch.logspace(-3, 1, 24)[None, :, None]  # rows of very different scale
    input_dim = -1 if layout == "out_in" else -2
    if layout == "in_out":
        w = w.mT.contiguous()
    output_dim = -2 if input_dim == -1 else -1
    w[1].select(output_dim, 0).zero_()  # an all-zero output channel must not divide by zero
    q, scale = quantize_tensor(w, "int8", input_dim)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.shape[input_dim] == 1 and scale.shape[0] == 4
    back = dequantize(q, scale, input_dim)
    # symmetric rounding: half a step (+ float32 rounding of the comparison itself)
    assert ((back - w).abs() <= scale / 2 * (1 + 1e-4)).all()
    assert not back[1].select(output_dim, 0).any()
    assert (q.abs().amax(dim=input_dim) >= 127).sum() > 0  # the range is used
    assert torch.equal(back, dequantize(q, scale, input_dim, use_torchao=False))  # torchao == torch formula
    q8, s8 = quantize_tensor(w, "fp8", input_dim)
    assert q8.dtype == torch.float8_e4m3fn
    back8 = dequantize(q8, s8, input_dim)
    assert torch.isfinite(back8).all()
    assert ((back8 - w).abs() <= w.abs() / 16 + s8 * 2.0 ** -9).all()  # 3 mantissa bits, subnormal floor
    assert torch.equal(back8, dequantize(q8, s8, input_dim, use_torchao=False))


def test_model_to_dtype_keeps_fp8_storage():
    weight = QuantizedWeight((2, 3, 4), "fp8", -1)
    weight.qdata.copy_(torch.randn(2, 3, 4).to(torch.float8_e4m3fn))
    before = weight.qdata.clone()
    weight.to(torch.float16)
    assert weight.qdata.dtype == torch.float8_e4m3fn and torch.equal(weight.qdata.float(), before.float())
    assert weight.scale.dtype == torch.float16 and weight[1].dtype == torch.float16


# ---------------------------------------------------------------- checkpoints that reload
@pytest.mark.parametrize("family,method,scheme,options", [
    ("mixtral", "reap", "int8", {}), ("gpt_oss", "average", "int8", {}), ("qwen2_moe", "mergemoe", "fp8", {}),
    # the paper's per-batch channel choice: per token (the default), rounding the base flips a token's
    # near-tied channel choices on this random model, which is not what the bound measures
    ("olmoe", "d2moe", "int8", {"base_prune": 0.2, "dynamic_scope": "batch"})])
def test_quantized_compressed_checkpoint_reloads_with_the_same_logits(family, method, scheme, options, calib_file,
                                                                      tokenizer, tmp_path):
    plain = _compress(family, method, calib_file, tokenizer, **options)
    plain_path = plain.save(tmp_path / "plain")
    result = _compress(family, method, calib_file, tokenizer, quantize=scheme, **options)
    path = result.save(tmp_path / "quant")
    expected = _logits(result.model)
    err = _rel(expected, _logits(plain.model))
    assert 0 < err < LOGIT_BOUND[scheme], err

    # reload both ways: same tensors, same computation
    loaded = moepress.load(path)
    remote = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    for model in (loaded, remote):
        torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
        block = decoder_layers(model)[0].mlp
        assert block.moepress_quant == decoder_layers(result.model)[0].mlp.moepress_quant
        for name in block.moepress_quant["tensors"]:
            weight = block._modules[name]
            assert weight.is_quantized_weight and weight.qdata.dtype == SCHEMES[scheme]  # (remote: its own class)
            assert name not in block.__dict__  # a dequantized copy lives only during a forward call

    # what is on disk: int8 / fp8 expert tensors, no full-precision copy, a smaller file
    dtypes = _stored_dtypes(path)
    want = {"int8": "I8", "fp8": "F8_E4M3"}[scheme]
    quantized = {k: v for k, v in dtypes.items() if k.endswith(".qdata")}
    assert quantized and set(quantized.values()) == {want}
    names = decoder_layers(result.model)[0].mlp.moepress_quant["tensors"]
    assert not [k for k in dtypes if k.rsplit(".", 1)[-1] in names]  # no full-precision copy
    assert (path / "model.safetensors").stat().st_size < 0.75 * (plain_path / "model.safetensors").stat().st_size

    record = json.loads((path / "moepress.json").read_text())["quantization"]
    assert record["scheme"] == scheme and record["library"] == "torchao" and record["library_version"] == "0.18.0"
    assert json.loads((path / "moepress.json").read_text())["export"] == "custom"
    assert record["expert_bytes_after"] < record["expert_bytes_before"] / 3
    assert parameter_counts(result.model) == parameter_counts(plain.model)  # the same parameters, fewer bits


def test_compress_quantize_equals_quantizing_the_compressed_checkpoint(calib_file, tokenizer, tmp_path):
    """`compress(quantize=)` and `moepress.quantize` of the saved compression give the same tensors (the
    benchmark's compression + quantization rows rely on it)."""
    plain = _compress("mixtral", "reap", calib_file, tokenizer).save(tmp_path / "plain")
    direct = _compress("mixtral", "reap", calib_file, tokenizer, quantize="int8").model
    later = moepress.quantize(plain, "int8")
    for a, b in zip(decoder_layers(direct), decoder_layers(later)):
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(a.mlp, name).qdata, getattr(b.mlp, name).qdata)
            assert torch.equal(getattr(a.mlp, name).scale, getattr(b.mlp, name).scale)


def test_the_cli_quantizes_after_compression_and_alone(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("olmoe")
    res = runner.invoke(app, ["compress", str(src), "-m", "reap", "--ratio", "0.5", "--calib", str(calib_file),
                              "--samples", "4", "--seq-len", "24", "--quantize", "fp8", "--out", str(tmp_path / "c"),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    assert "experts quantized to float8_e4m3fn" in " ".join(res.output.split())
    assert set(_stored_dtypes(tmp_path / "c").values()) >= {"F8_E4M3"}
    assert not (tmp_path / ".c.work").exists()  # --quantize runs resident
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", str(src), "--out", str(out), "--scheme", "int8"])
    assert res.exit_code == 0, res.output
    original = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    model = moepress.load(out)
    assert 0 < _rel(_logits(model), _logits(original)) < LOGIT_BOUND["int8"]
    record = json.loads((out / "moepress.json").read_text())
    assert record["method"] == "quantize" and record["quantized_from"] == str(src)
    assert record["quantization"]["model_bytes_after"] < record["quantization"]["model_bytes_before"]



# ---------------------------------------------------------------- clear errors
def test_the_torch_free_choices_are_the_schemes():
    """The CLI checks --quantize against checks.QUANTIZE_CHOICES before torch loads: the same schemes."""
    from moepress.checks import QUANTIZE_CHOICES
    from moepress.quantization import CHOICES

    assert QUANTIZE_CHOICES == CHOICES == ("none", *SCHEMES)


def test_bad_quantize_requests_are_clear_errors(tiny_checkpoint, calib_file, tokenizer, tmp_path):
    src = tiny_checkpoint("mixtral")
    with pytest.raises(InputError, match="none, int8, fp8"):
        moepress.compress(tiny_model("mixtral"), "frequency", 0.5, quantize="int4", tokenizer=tokenizer)
    res = runner.invoke(app, ["compress", str(src), "-m", "reap", "--ratio", "0.5", "--quantize", "int4",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "quantize must be one of none, int8, fp8" in " ".join(res.output.split())
    res = runner.invoke(app, ["quantize", str(src), "--scheme", "none", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "int8 or fp8" in res.output
    with pytest.raises(InputError, match="without offload"):
        moepress.compress(str(src), "frequency", 0.5, quantize="int8", offload=True)
    quantized = moepress.quantize(tiny_model("mixtral"), "int8")
    with pytest.raises(InputError, match="already quantized"):
        quantize_experts(quantized, "int8")
    lowrank = _compress("qwen2_moe", "moe_i2", calib_file, tokenizer).model
    with pytest.raises(InputError, match="'lowrank' block, which --quantize does not support"):
        quantize_experts(lowrank, "fp8")


# ---------------------------------------------------------------- shipped code stands alone
_STANDALONE = textwrap.dedent("""
    import importlib.util, os, sys
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "moepress"))]
    assert importlib.util.find_spec("moepress") is None, "moepress is still importable"
    if sys.argv[3] == "no-torchao":
        sys.modules["torchao"] = None  # import torchao now fails: the torch formula must take over
    import torch, transformers
    data = torch.load(sys.argv[1])
    model = transformers.AutoModelForCausalLM.from_pretrained(data["dir"], trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(data["ids"]).logits
    assert not [m for m in sys.modules if m.split(".")[0] == "moepress"]
    assert (sys.modules.get("torchao") is None) == (sys.argv[3] == "no-torchao")
    torch.save(logits, sys.argv[2])
""")


def test_quantized_checkpoint_loads_without_moepress_or_torchao(calib_file, tokenizer, tmp_path):
    """from_pretrained(trust_remote_code=True) with neither moepress nor torchao importable: the torch
    formula gives the logits torchao's dequantize gave in memory (the two agree bit for bit)."""
    torchao = "no-torchao"
    result = _compress("mixtral", "reap", calib_file, tokenizer, quantize="int8")
    path = result.save(tmp_path / "q")
    torch.save({"dir": str(path), "ids": IDS}, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _STANDALONE, str(tmp_path / "in.pt"), str(tmp_path / "out.pt"),
                           torchao], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), _logits(result.model), rtol=0, atol=0)


def test_per_layer_pruned_and_quantized_checkpoint_reloads(calib_file, tokenizer, tmp_path):
    """--layers/--budget leave pruned stock blocks whose router has fewer rows than the config's count;
    quantized, they become identity remaps whose router must be rebuilt with that count on load."""
    result = _compress("mixtral", "frequency", calib_file, tokenizer, layers="0", quantize="int8")
    counts = [layer.mlp.num_experts for layer in decoder_layers(result.model)]
    assert counts[0] < counts[1]  # layer 0 pruned, layer 1 untouched
    expected = _logits(result.model)
    path = result.save(tmp_path / "out")
    for loaded in (moepress.load(path),
                   transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)):
        assert torch.equal(_logits(loaded.eval()), expected)
