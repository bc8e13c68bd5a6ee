"""D²-MoE's layer-wise Fisher (methods/d2moe/fisher.py) against back-propagation through the resident
model, and d2moe streamed (offload) against d2moe resident."""

from __future__ import annotations


import pytest
import torch

import moepress
from moepress.arch import moe_layer_views
from moepress.testing import tiny_model
from moepress.methods.d2moe.fisher import PROJECTIONS, _split, fisher_bases
from moepress.ops.fisher_merge import fisher_merge

RTOL = 1e-4  # float32: the layer-wise pass recomputes each layer; only the rounding of sums may differ


def _ids(n=5, length=16, seed=1):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def resident_fisher_bases(model, ids, batch_size=1):
    """Reference: the batch loss `model(ids, labels=ids).loss` back-propagated through the whole
    resident model, squared expert-weight gradients averaged over batches (the computation the
    layer-wise pass replaces), frequencies counted by hooks on the routers."""
    views = moe_layer_views(model)
    params = [p for v in views for p in (v.experts.gate_up_proj, v.experts.down_proj)]
    acc = [torch.zeros_like(p) for p in params]
    counts = {v.layer_index: torch.zeros(v.num_experts, dtype=torch.float64) for v in views}

    def counter(layer, num):
        def hook(_module, _inputs, output):
            counts[layer] += torch.bincount(output[-1].reshape(-1), minlength=num).double()
        return hook

    hooks = [v.router.register_forward_hook(counter(v.layer_index, v.num_experts)) for v in views]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(p in set(params))
    batches = ids.split(batch_size)
    try:
        for batch in batches:
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            for a, g in zip(acc, torch.autograd.grad(loss, params)):
                a.add_(g.square())
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    out = {}
    for k, v in enumerate(views):
        split = _split(v, [acc[2 * k] / len(batches), acc[2 * k + 1] / len(batches)])
        weights = {"gate": v.gate_proj, "up": v.up_proj, "down": v.down_proj}
        out[v.layer_index] = {p: fisher_merge(weights[p].detach(), split[p], counts[v.layer_index]).float()
                              for p in PROJECTIONS}
        out[v.layer_index]["frequency"] = counts[v.layer_index]
    return out


CASES = {  # family -> tiny-model overrides; each case adds one thing the chain rule must get right
    "mixtral": {},
    "deepseek_v3": {},                                          # a dense first layer below the MoE layers
    "gpt_oss": {},                                              # biased experts, a tuple-returning block
    "qwen2_moe": {"num_layers": 3, "mlp_only_layers": [1]},     # a dense layer between MoE layers; shared expert
    "olmoe": {"tie_word_embeddings": True},                     # the head is the input embedding
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_layer_wise_fisher_equals_back_propagation_through_the_resident_model(family):
    model = tiny_model(family, **CASES[family])
    ids = _ids()  # 5 sequences in batches of 2: the last batch is smaller
    flags = [p.requires_grad for p in model.parameters()]
    got = fisher_bases(model, ids, batch_size=2)
    ref = resident_fisher_bases(model, ids, batch_size=2)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert sorted(got) == sorted(ref) == [v.layer_index for v in moe_layer_views(model)]
    for layer, expected in ref.items():
        assert torch.equal(got[layer]["frequency"], expected["frequency"])
        assert got[layer]["frequency"].sum() == ids.numel() * model.config.num_experts_per_tok
        for p in PROJECTIONS:
            assert torch.allclose(got[layer][p], expected[p], rtol=RTOL, atol=1e-7), (layer, p)
            # the Fisher weights matter: the frequency-only merge is far from the Fisher-merged base
            view = next(v for v in moe_layer_views(model) if v.layer_index == layer)
            weight = getattr(view, f"{p}_proj").detach()
            freq_only = fisher_merge(weight, torch.ones_like(weight), expected["frequency"])
            assert (freq_only - expected[p]).abs().max() > 100 * RTOL * expected[p].abs().max()


def test_fisher_leaves_no_scratch_files(tmp_path):
    model = tiny_model("mixtral")

    class Store:  # the resident model, with a work directory as a streaming store has
        work_dir = tmp_path

        def load_original(self, index):
            return model.model.layers[index]

        def release(self, index):
            pass

    bases = fisher_bases(model, _ids(n=2), store=Store())
    assert not (tmp_path / "fisher" / "inputs").exists()   # the inputs are gone once the walk is done
    assert sorted(f.name for f in (tmp_path / "fisher" / "bases").iterdir()) == [
        "layer-00000.safetensors", "layer-00001.safetensors"]
    assert bases[1]["gate"].shape == (96, 64)
    del bases
    assert not (tmp_path / "fisher").exists()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_d2moe_streamed_equals_d2moe_resident(family, tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint(family)
    common = dict(calib=calib_file, samples=6, seq_len=32, batch_size=4, base_prune=0.1, fisher_batch_size=2)
    resident = moepress.compress(src, "d2moe", 0.4, offload=False, **common)
    streamed = moepress.compress(src, "d2moe", 0.4, offload=tmp_path / "work", **common)
    assert streamed.record["offload"] and not resident.record["offload"]
    for layer, record in resident.records.items():
        assert streamed.records[layer]["ranks"] == record["ranks"]
        assert streamed.records[layer]["relative_activation_error"] == pytest.approx(
            record["relative_activation_error"], rel=1e-5)
    out_resident = resident.save(tmp_path / "resident")
    out_streamed = streamed.save(tmp_path / "streamed")
    a, b = moepress.load(out_resident), moepress.load(out_streamed)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert torch.allclose(tensor, state_b[name], rtol=1e-5, atol=1e-6), name
    ids = _ids(n=2, length=24)
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max() <= 1e-5

