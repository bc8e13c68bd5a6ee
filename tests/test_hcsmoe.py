"""HC-SMoE as its authors run it (docs/algorithms.md#hcsmoe): statistics, features, clustering, merge weights."""

from __future__ import annotations

import copy

import pytest
import torch

import moepress
from moepress.arch import decoder_layers, moe_layer_views
from moepress.testing import tiny_model
from moepress.methods import ConfigError, build_method
from moepress.ops.clustering import groups_of, hierarchical_grouping
from moepress.calib.packing import build_calibration
from moepress.methods.hcsmoe.config import HCSMoEConfig
from moepress.methods.hcsmoe.method import HCSMoE
from moepress.ops.kmeans import standardised_assignment, standardised_kmeans_grouping
from moepress.run.pipeline import compress_layers
from moepress.ops.merging import frequency_weights


def _ids(seed=1):
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


def _points(*xs):
    return torch.tensor([[float(x)] for x in xs])


def test_average_linkage_gives_the_hand_computed_partitions():
    # 0, 1, 3, 5.8: after {0,1}, average d({0,1},3) = 2.5 < d(3,5.8) = 2.8 (complete would say 3 > 2.8)
    method = build_method("hcsmoe", experts=2, cluster="hierarchical")
    assert groups_of(method.group(_points(0, 1, 3, 5.8), 2, 0)) == [[0, 1, 2], [3]]
    assert groups_of(hierarchical_grouping(_points(0, 1, 3, 5.8), 2, linkage="complete", metric="euclidean")) \
        == [[0, 1], [2, 3]]
    # 0, 1, 2.5, 4.2: average d({0,1},2.5) = 2.0 > d(2.5,4.2) = 1.7 (single would say 1.5 < 1.7)
    assert groups_of(method.group(_points(0, 1, 2.5, 4.2), 2, 0)) == [[0, 1], [2, 3]]
    assert groups_of(hierarchical_grouping(_points(0, 1, 2.5, 4.2), 2, linkage="single", metric="euclidean")) \
        == [[0, 1, 2], [3]]


def test_distance_is_euclidean_as_in_the_authors_code():
    # cosine pairs vectors by direction, Euclidean by position: the two defaults disagree here
    features = torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.0, 1.0], [0.0, 10.0]])
    euclidean = build_method("hcsmoe", experts=3, cluster="hierarchical")
    assert euclidean.config.metric == "euclidean"
    assert groups_of(euclidean.group(features, 3, 0)) == [[0, 2], [1], [3]]
    cosine = build_method("hcsmoe", experts=2, cluster="hierarchical", metric="cosine")
    assert groups_of(cosine.group(features, 2, 0)) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("cluster", ["kmeans", "hierarchical"])
def test_identical_experts_cluster_together_and_merge_without_error(cluster, tokenizer, calib_file):
    model = tiny_model("mixtral")
    with torch.no_grad():
        for view in moe_layer_views(model):
            view.experts.gate_up_proj[5] = view.experts.gate_up_proj[2]
            view.experts.down_proj[5] = view.experts.down_proj[2]
        before = model(_ids()).logits.clone()
    result = moepress.compress(model, "hcsmoe", experts=7, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer, cluster=cluster)
    for record in result.records.values():
        assert [2, 5] in record["groups"] and record["cluster_sizes"].count(2) == 1
        assert record["calib_rel_error"] <= 1e-6
    with torch.no_grad():
        assert (result.model(_ids()).logits - before).abs().max() <= 1e-5


@pytest.mark.parametrize("cluster", ["hierarchical", "kmeans"])
def test_keeping_every_expert_is_the_identity(cluster, tokenizer, calib_file):
    model = tiny_model("olmoe")
    with torch.no_grad():
        before = model(_ids()).logits.clone()
    result = moepress.compress(model, "hcsmoe", experts=8, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer, cluster=cluster)
    assert all(r["groups"] == [[j] for j in range(8)] for r in result.records.values())
    with torch.no_grad():
        assert (result.model(_ids()).logits - before).abs().max() <= 1e-6


def test_frequency_merge_weights_sum_to_one_per_cluster(tokenizer, calib_file):
    result = moepress.compress(tiny_model("qwen3_moe"), "hcsmoe", 0.5, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer)
    for record in result.records.values():
        weights = torch.tensor(record["merge_weights"], dtype=torch.float64)
        for group in record["groups"]:
            assert abs(float(weights[group].sum()) - 1.0) <= 1e-5
        assert sum(record["cluster_sizes"]) == 8 and len(record["cluster_sizes"]) == 4
    freq = torch.tensor([3.0, 1.0, 0.0, 0.0, 6.0])
    w = frequency_weights(freq, torch.tensor([0, 0, 1, 1, 0]))
    torch.testing.assert_close(w, torch.tensor([0.3, 0.1, 0.5, 0.5, 0.6], dtype=torch.float64))


def test_scripted_kmeans_recovers_separated_blobs_and_is_seeded():
    blobs = torch.cat([torch.randn(3, 4, generator=torch.Generator().manual_seed(s)) * 0.01 + 5 * s
                       for s in range(3)])
    for seed in range(4):
        assert groups_of(standardised_kmeans_grouping(blobs, 3, seed=seed)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    spread = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    maps = [standardised_kmeans_grouping(spread, 4, seed=s) for s in (0, 0, 1)]
    assert torch.equal(maps[0], maps[1])
    assert all(int(m.max()) + 1 == 4 for m in maps)


def test_default_is_the_authors_default_run():
    """K-means (their code's default and what their scripts execute), frequency merge, statistics of
    the unmerged model; hierarchical/average/Euclidean is one option away."""
    method = build_method("hcsmoe", ratio=0.5)
    cfg = method.config
    assert (cfg.cluster, cfg.merge, cfg.propagation, cfg.export) == ("kmeans", "frequency", "original", "custom")
    assert method.requirements().propagation == "original"
    assert build_method("hcsmoe", ratio=0.5, propagation="compressed").requirements().propagation == "compressed"
    assert build_method("hcsmoe", ratio=0.5, cluster="hierarchical").config.linkage == "average"


def _upgma(features: torch.Tensor, m: int) -> list[list[int]]:
    """Average linkage written out: merge the two clusters with the smallest mean pairwise
    Euclidean distance until m remain (the rule of the authors' `hierarchical_clustering`)."""
    d = torch.cdist(features.double(), features.double())
    clusters = [[j] for j in range(features.shape[0])]
    while len(clusters) > m:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                mean = float(d[clusters[a]][:, clusters[b]].mean())
                if best is None or mean < best[0]:
                    best = (mean, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return sorted(clusters)


@pytest.mark.parametrize("seed", range(6))
def test_hierarchical_option_is_average_linkage_on_euclidean_features(seed):
    features = torch.randn(8, 5, generator=torch.Generator().manual_seed(seed)) * torch.rand(8, 1) * 3
    method = build_method("hcsmoe", ratio=0.5, cluster="hierarchical")
    for m in (2, 3, 4, 6):
        assert groups_of(method.group(features, m, 0)) == _upgma(features, m)


def test_kmeans_assigns_each_expert_to_its_relatively_nearest_centre():
    """The authors' K-means standardises each centre's column of distances over the experts: the
    expert at 4 is nearer the centre at 0 but, compared with the other experts, relatively nearer
    the one at 10 (z = +0.31 against -0.31), so it joins 10 (plain nearest-centre would say 0)."""
    x = _points(0, 0.5, 1, 1.5, 4, 10).double()
    centres = _points(0, 10).double()
    assert standardised_assignment(x, centres).tolist() == [0, 0, 0, 0, 1, 1]
    assert torch.cdist(x, centres).argmin(dim=1).tolist() == [0, 0, 0, 0, 0, 1]
    # the full loop from these data: every k-means++ draw ends in the same two groups
    for seed in range(5):
        assert groups_of(standardised_kmeans_grouping(x, 2, seed=seed)) == [[0, 1, 2, 3], [4, 5]]


class _InputSpy(HCSMoE):
    """HC-SMoE that keeps the MoE inputs each layer's statistics were computed on."""

    def compress_layer(self, ctx):
        self.seen[ctx.position] = torch.cat(ctx.stats.batches).clone()
        return super().compress_layer(ctx)


def _moe_inputs_of_unmerged_model(model, ids, batch_size):
    captured = {i: [] for i in range(len(moe_layer_views(model)))}
    handles = [v.block.register_forward_pre_hook(
        lambda module, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1]).clone()))
        for i, v in enumerate(moe_layer_views(model))]
    with torch.no_grad():
        for b in range(0, ids.shape[0], batch_size):
            model(ids[b:b + batch_size])
    for h in handles:
        h.remove()
    return {i: torch.cat(v) for i, v in captured.items()}


@pytest.mark.parametrize("propagation", ["original", "compressed"])
def test_statistics_come_from_the_unmerged_model_by_default(propagation, tokenizer, calib_file):
    model = tiny_model("mixtral", num_layers=3)
    calibration = build_calibration(tokenizer, calib_file, samples=4, seq_len=32)
    expected = _moe_inputs_of_unmerged_model(copy.deepcopy(model), calibration.input_ids, 2)
    spy = _InputSpy(HCSMoEConfig(experts=4, propagation=propagation))
    spy.seen = {}
    compress_layers(model, spy, calibration, batch_size=2)
    torch.testing.assert_close(spy.seen[0], expected[0])  # nothing merged before the first layer
    for i in (1, 2):
        if propagation == "original":
            torch.testing.assert_close(spy.seen[i], expected[i], rtol=1e-5, atol=1e-5)
        else:  # through the merged layers: the states differ
            assert (spy.seen[i] - expected[i]).abs().max() > 1e-3


def test_merged_experts_are_the_frequency_weighted_averages_of_their_members(tokenizer, calib_file):
    """Layer 0 (its inputs are the model's): counts of top-k membership -> B_j = f_j / sum_C f, and
    every merged tensor is sum_j B_j W_j over the group."""
    model = tiny_model("mixtral")
    original = copy.deepcopy(model)
    calibration = build_calibration(tokenizer, calib_file, samples=4, seq_len=32)
    inputs = _moe_inputs_of_unmerged_model(original, calibration.input_ids, 8)[0]
    view = moe_layer_views(original)[0]
    with torch.no_grad():
        freq = torch.bincount(view.route(inputs).index.flatten(), minlength=8).double()
    result = moepress.compress(model, "hcsmoe", experts=4, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer)
    record = result.records[min(result.records)]
    weights = torch.tensor(record["merge_weights"], dtype=torch.float64)
    block = decoder_layers(result.model)[min(result.records)].mlp
    merged = block.unpack()
    for i, group in enumerate(record["groups"]):
        expected_w = freq[group] / freq[group].sum()
        torch.testing.assert_close(weights[group], expected_w, rtol=1e-6, atol=1e-6)
        for name, stacked in (("gate", view.gate_proj), ("up", view.up_proj), ("down", view.down_proj)):
            want = sum(float(w) * stacked[j].double() for j, w in zip(group, expected_w))
            torch.testing.assert_close(merged[name][i].double(), want, rtol=1e-5, atol=1e-6)
        assert all(int(block.expert_map[j]) == i for j in group)  # every member routes to it


def test_config_errors_are_for_people():
    with pytest.raises(ConfigError, match="cluster='hierarchical'"):
        build_method("hcsmoe", ratio=0.5, metric="cosine")
    with pytest.raises(ConfigError, match="cluster='hierarchical'"):
        build_method("hcsmoe", ratio=0.5, linkage="single")
    with pytest.raises(ConfigError, match="propagation must be one of"):
        build_method("hcsmoe", ratio=0.5, propagation="sequential")
    with pytest.raises(ConfigError, match="ward"):
        build_method("hcsmoe", ratio=0.5, cluster="hierarchical", linkage="ward", metric="cosine")
    with pytest.raises(ConfigError, match="cluster must be one of"):
        build_method("hcsmoe", ratio=0.5, cluster="hirarchical")
    with pytest.raises(ConfigError, match="metric must be one of"):
        build_method("hcsmoe", ratio=0.5, metric="l1")


def test_streamed_run_equals_the_in_memory_run(tiny_checkpoint, calib_file, tmp_path):
    """Bounded memory (`offload`): the original-model states are computed from the onloaded layer
    before it is compressed, as in memory; the record says which propagation was used."""
    path = str(tiny_checkpoint("mixtral"))
    settings = dict(experts=4, calib=calib_file, samples=4, seq_len=32)
    resident = moepress.compress(path, "hcsmoe", offload=False, **settings)
    streamed = moepress.compress(path, "hcsmoe", offload=tmp_path / "work", **settings)
    assert resident.record["propagation"] == streamed.record["propagation"] == "original"
    for i, record in resident.records.items():
        assert streamed.records[i]["groups"] == record["groups"]
        assert streamed.records[i]["merge_weights"] == pytest.approx(record["merge_weights"], abs=1e-6)
    compressed = moepress.compress(path, "hcsmoe", offload=False, propagation="compressed", **settings)
    assert compressed.record["propagation"] == "compressed"
