"""The family table (modeling/moepress_family.py) against the live transformers models, the shared
expert arithmetic, and checkpoints that load where moepress is not importable."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

import moepress
from moepress.arch import FAMILIES, SUPPORTED, decoder_layers, moe_layer_views, validate_expert_count
from moepress.testing import tiny_model
from moepress.modeling import MODELING_DIR, MODELING_FILES


def _eager(view):
    view.experts.config._experts_implementation = "eager"  # the stock reference loop
    return view


# ---------------------------------------------------------------- each row states what transformers does
@pytest.mark.parametrize("family", SUPPORTED)
def test_family_row_matches_the_live_model(family, tiny_checkpoint):
    spec, model = FAMILIES[family], tiny_model(family)
    view = moe_layer_views(model)[0]
    block, e, h, i = view.block, view.num_experts, view.hidden_size, view.intermediate_size
    assert type(model).__name__ == spec.causal_lm_class
    assert model.config.to_dict()[spec.expert_count_key] == e
    assert view.router.weight.shape == (e, h)
    assert {n: t.shape for n, t in view.experts.named_parameters()} == view.expert_format.stored_shapes(e, h, i)
    for name in spec.router_buffers:
        assert getattr(view.router, name).shape == (e,)
    for name in spec.shared_expert_attrs:
        assert isinstance(getattr(block, name), torch.nn.Module)
    assert (spec.shared_expert_gate is None) or spec.shared_expert_gate in spec.shared_expert_attrs
    with torch.no_grad():
        assert isinstance(block(torch.randn(1, 3, h)), tuple) == spec.block_returns_tuple
    with safe_open(tiny_checkpoint(family) / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
    layer = f"model.layers.{view.layer_index}"
    if spec.hub_expert_names is None:
        assert f"{layer}.mlp.experts.gate_up_proj" in keys
    else:
        assert {f"{layer}.{spec.hub_block}.experts.0.{n}.weight" for n in spec.hub_expert_names} <= keys


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_score_kind_renormalisation_and_scale_reproduce_the_router(family, norm_topk_prob):
    """weights = scores[top-k] (/ their sum iff the row says so) x scale, scores by `score_kind`."""
    view = moe_layer_views(tiny_model(family, norm_topk_prob=norm_topk_prob))[0]
    with torch.no_grad():
        r = view.route(torch.randn(32, view.hidden_size))
    expected = r.scores.gather(1, r.index)
    if view.renormalises:
        expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(r.weights, expected * view.routing_scale)
    assert view.renormalises == {"always": True, "never": False}.get(view.spec.renormalise, norm_topk_prob)


@pytest.mark.parametrize("family,overrides", [
    ("deepseek_v3", {}),  # tiny V3: n_group=2, topk_group=1, always group-limited
    ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}),
])
def test_group_routing_limits_each_token_to_topk_group_groups(family, overrides):
    view = moe_layer_views(tiny_model(family, **overrides))[0]
    groups = view.group_routing
    assert (groups.n_group, groups.topk_group) == (2, 1)
    with torch.no_grad():
        index = view.route(torch.randn(64, view.hidden_size)).index
    per_group = view.num_experts // groups.n_group
    assert all(len(set((row // per_group).tolist())) <= groups.topk_group for row in index)


def test_group_routing_off_and_expert_count_limits():
    assert moe_layer_views(tiny_model("deepseek_v2"))[0].group_routing is None  # topk_method="greedy"
    assert moe_layer_views(tiny_model("mixtral"))[0].group_routing is None
    v3 = tiny_model("deepseek_v3").config                        # 2 groups, top-2 score per group
    validate_expert_count(v3, 4)
    for bad in (3, 2):  # not divisible / one expert per group cannot be scored by its top-2
        with pytest.raises(ValueError, match="n_group=2"):
            validate_expert_count(v3, bad)
    v2 = tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=2, topk_group=2).config
    validate_expert_count(v2, 2)  # V2 scores a group by its best expert: one per group is enough


def test_deepseek_v2_router_runs_with_one_expert_per_group():
    """The fact behind `group_score_experts=1` for V2 (and 2 for V3): run the routers at that size."""
    v2 = moe_layer_views(tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=2, topk_group=2,
                                    n_routed_experts=2))[0]
    assert v2.route(torch.randn(4, v2.hidden_size)).index.shape == (4, 2)
    v3 = moe_layer_views(tiny_model("deepseek_v3", n_group=2, topk_group=2, n_routed_experts=2))[0]
    with pytest.raises(RuntimeError):
        v3.route(torch.randn(4, v3.hidden_size))


# ---------------------------------------------------------------- one expert forward, one layout conversion
@pytest.mark.parametrize("family", SUPPORTED)
def test_expert_forward_is_the_stock_expert_bit_for_bit(family):
    view = _eager(moe_layer_views(tiny_model(family))[0])
    x = torch.randn(6, view.hidden_size)
    with torch.no_grad():
        for j in range(view.num_experts):
            index = torch.full((6, 1), j)
            stock = view.experts(x, index, torch.ones(6, 1))
            assert torch.equal(view.expert(j, x), stock)
    assert view.parameters_per_expert * view.num_experts == sum(p.numel() for p in view.experts.parameters())


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_pack_and_unpack_are_inverse(family):
    view = moe_layer_views(tiny_model(family))[0]
    fmt, e = view.expert_format, view.experts
    stored = {n: t.detach() for n, t in e.named_parameters()}
    unpacked = fmt.unpack(**stored)
    assert unpacked["gate"].shape == (view.num_experts, view.intermediate_size, view.hidden_size)
    repacked = fmt.pack(**unpacked)
    assert repacked.keys() == stored.keys()
    for name in stored:
        assert torch.equal(repacked[name], stored[name])
    one = fmt.unpack(*(stored[n][3] for n in stored if n in ("gate_up_proj", "down_proj")))  # one expert, no dim E
    assert torch.equal(one["up"], unpacked["up"][3]) and torch.equal(one["down"], unpacked["down"][3])


def test_view_intermediate_of_a_view_convention_expert():
    view = moe_layer_views(tiny_model("gpt_oss"))[0]
    expert = {"gate": view.gate_proj[5], "up": view.up_proj[5],
              "gate_bias": view.gate_bias[5], "up_bias": view.up_bias[5]}
    x = torch.randn(7, view.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(view.intermediate_of(expert, x), view.intermediate(5, x))


# ---------------------------------------------------------------- shipped code stands alone
_ALLOWED_IMPORTS = {"__future__", "torch", "transformers", "dataclasses", "typing", "math", "collections",
                    "importlib", "copy"}  # importlib: moepress_quant.py looks up the optional torchao


def test_shipped_files_import_only_torch_transformers_and_each_other():
    for name in MODELING_FILES:
        tree = ast.parse((MODELING_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module}.py" in MODELING_FILES, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert {r.split(".")[0] for r in roots} <= _ALLOWED_IMPORTS, (name, roots)


_STANDALONE = textwrap.dedent("""
    import importlib.util, os, sys
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "moepress"))]
    assert importlib.util.find_spec("moepress") is None, "moepress is still importable"
    import torch, transformers
    data = torch.load(sys.argv[1])
    out = {}
    for name, path in data["dirs"].items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            out[name] = model(data["ids"]).logits
    assert not [m for m in sys.modules if m.split(".")[0] == "moepress"]
    torch.save(out, sys.argv[2])
""")


def test_custom_checkpoints_load_where_moepress_is_not_importable(tokenizer, calib_file, tmp_path):
    """auto_map code alone (no moepress on sys.path) rebuilds every block kind with the same logits."""
    runs = {"remap": ("gpt_oss", "average", {}), "delta": ("qwen2_moe", "d2moe", {"base_prune": 0.1}),
            "compressed_experts": ("deepseek_v3", "compressed_experts", {})}
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    dirs, expected = {}, {}
    for kind, (family, method, options) in runs.items():
        result = moepress.compress(tiny_model(family), method, 0.5, calib=calib_file, samples=4, seq_len=24,
                                   tokenizer=tokenizer, **options)
        dirs[kind] = str(result.save(tmp_path / kind))
        with torch.no_grad():
            expected[kind] = result.model(ids).logits
        assert {b.kind for b in decoder_layers(result.model).modules() if hasattr(b, "kind")} == {kind}
    torch.save({"dirs": dirs, "ids": ids}, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _STANDALONE, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for kind in runs:
        torch.testing.assert_close(got[kind], expected[kind], atol=1e-5, rtol=1e-5)
