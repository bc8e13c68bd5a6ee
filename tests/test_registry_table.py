"""The (method x architecture) table of docs/design.md#method-tests, driven by the registry.

Every registered method runs on every supported family through the public API only:
`moepress.compress(path, ...)` -> `result.save(out)` -> load with plain transformers and with
`moepress.load` -> the same logits as the compressed model in memory. A newly registered method
joins the table with `DEFAULT_OPTIONS`; when those cannot make a valid tiny run the case fails
(it is never skipped), and the method gets a row in `OPTIONS`.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import moepress
from moepress.arch import SUPPORTED as FAMILIES
from moepress.methods import available_methods, build_method

METHODS = tuple(available_methods())

# Every tiny family has 8 routed experts and top-2 routing (moepress.testing.tiny): ratio 0.5 keeps
# 4 >= top-k experts for pruning/merging and replaces 1 of 2 activated experts for compressed_experts.
# A method whose tiny run needs more (or other) options gets a row here, merged over the default.
DEFAULT_OPTIONS = {"ratio": 0.5}
OPTIONS = {
    # MergeMoE's least squares is full rank only with >= intermediate_size (48..96) tokens; the
    # tokens routed to one cluster are fewer here (it warns), all 128 calibration tokens are not.
    "mergemoe": {"tokens": "all"},
}

# Logits of the reloaded checkpoints vs the in-memory result: the same fp32 weights and the same
# code, so only kernel-order rounding separates them.
ATOL = 1e-5
# Calibration kept tiny (4 x 32 tokens): the table tests plumbing, not quality.
CALIBRATION = {"samples": 4, "seq_len": 32}


def _ids():
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(7))


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


@pytest.fixture(scope="module")
def source_logits(tiny_checkpoint):
    """`source_logits(family)`: logits of the uncompressed tiny checkpoint (cached per family)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _logits(moepress.load(tiny_checkpoint(family)))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_compress_save_reload_same_logits(method, family, tiny_checkpoint, calib_file, source_logits, tmp_path):
    options = {**DEFAULT_OPTIONS, **OPTIONS.get(method, {})}
    result = moepress.compress(tiny_checkpoint(family), method, calib=calib_file, offload=False, **CALIBRATION, **options)
    expected = _logits(result.model)  # before save: an offloaded result keeps meta layers after it
    assert (expected - source_logits(family)).abs().max() > 1e-3, "the method left the model unchanged"

    out = result.save(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    custom = result.record["export"] == "custom"
    assert ("auto_map" in config) == custom and ("moepress" in config) == custom
    assert config["architectures"][0].startswith("Moepress") == custom  # what serving engines build
    record = json.loads((out / "moepress.json").read_text())
    assert record["method"] == method and record["family"] == family
    if result.requirements.calibration:
        assert record["calibration"]["tokens"] == CALIBRATION["samples"] * CALIBRATION["seq_len"]
    else:  # e.g. compressed_experts: nothing is measured, so no calibration text is read
        assert record["calibration"] is None

    # Stock results must load without remote code; custom ones carry theirs (auto_map).
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=custom).eval()
    assert (type(plain).__module__.startswith("transformers.")) != custom
    torch.testing.assert_close(_logits(plain), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(moepress.load(out)), expected, atol=ATOL, rtol=0)
    _assert_batch_and_cache_invariant(plain, expected)


def _assert_batch_and_cache_invariant(model, expected):
    """What a server needs of every block kind: a sequence's logits do not depend on the sequences
    batched with it, and decoding with the KV cache gives the logits of the full forward."""
    ids = _ids()
    with torch.no_grad():
        for row in range(ids.shape[0]):
            torch.testing.assert_close(model(ids[row:row + 1]).logits[0], expected[row], atol=ATOL, rtol=0)
        prefix = model(ids[:, :12], use_cache=True)
        step = model(ids[:, 12:13], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, expected[:, 12], atol=ATOL, rtol=0)


# Offloading every cell would triple the table's time; each method gets one family in turn, which
# also covers every family (more methods than families).
OFFLOAD_CASES = [(method, FAMILIES[i % len(FAMILIES)]) for i, method in enumerate(METHODS)]


@pytest.mark.parametrize("method,family", OFFLOAD_CASES)
def test_offloaded_run_saves_the_in_memory_result(method, family, tiny_checkpoint, calib_file, tmp_path):
    """The CLI's default for a local model: layers streamed from disk give the same checkpoint;
    a method that needs the whole model resident refuses offload with a message saying so."""
    options = {**DEFAULT_OPTIONS, **OPTIONS.get(method, {})}
    src = tiny_checkpoint(family)
    # Whether a method needs the resident model may depend on its options (moe_i2's allocation).
    if build_method(method, **options).requirements().resident_model:
        with pytest.raises(ValueError, match="without offload"):
            moepress.compress(src, method, calib=calib_file, offload=tmp_path / "work", **CALIBRATION, **options)
        return
    expected = _logits(moepress.compress(src, method, calib=calib_file, offload=False, **CALIBRATION, **options).model)
    streamed = moepress.compress(src, method, calib=calib_file, offload=tmp_path / "work", **CALIBRATION, **options)
    out = streamed.save(tmp_path / "out")
    custom = streamed.record["export"] == "custom"
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=custom).eval()
    torch.testing.assert_close(_logits(plain), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(moepress.load(out)), expected, atol=ATOL, rtol=0)


def test_design_method_names_stay_registered():
    """docs/design.md#method-names: these registry keys are a contract users' scripts call as written."""
    contract = {"frequency", "reap", "naee", "average", "msmoe", "hcsmoe", "zipit", "mergemoe", "d2moe",
                "compressed_experts"}
    assert contract <= set(METHODS)


def test_the_cli_s_torch_free_method_names_are_the_registry_s():
    """`moepress compress -m NAME` is checked before torch is imported, against the method package
    folders (checks.method_package_names); the registry keys by `cls.name`. One list, both ways."""
    from moepress.checks import method_package_names

    assert method_package_names() == sorted(available_methods())
    for name, cls in available_methods().items():
        assert cls.__module__.split(".")[2] == name, (name, cls.__module__)  # moepress.methods.<name>....
