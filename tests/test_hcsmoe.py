"""HC-SMoE as its authors run it (ALGORITHMS.md §4.1, §7.5): features, distance, linkage, merge weights."""

from __future__ import annotations

import pytest
import torch

import moepress
from moepress.arch import moe_layer_views, tiny_model
from moepress.methods import ConfigError, build_method
from moepress.ops.clustering import groups_of, hierarchical_grouping
from moepress.ops.kmeans import standardised_kmeans_grouping
from moepress.ops.merging import frequency_weights


def _ids(seed=1):
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


def _points(*xs):
    return torch.tensor([[float(x)] for x in xs])


def test_average_linkage_gives_the_hand_computed_partitions():
    # 0, 1, 3, 5.8: after {0,1}, average d({0,1},3) = 2.5 < d(3,5.8) = 2.8 (complete would say 3 > 2.8)
    method = build_method("hcsmoe", experts=2)
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
    euclidean = build_method("hcsmoe", experts=3)
    assert euclidean.config.metric == "euclidean"
    assert groups_of(euclidean.group(features, 3, 0)) == [[0, 2], [1], [3]]
    cosine = build_method("hcsmoe", experts=2, metric="cosine")
    assert groups_of(cosine.group(features, 2, 0)) == [[0, 1], [2, 3]]


def test_identical_experts_cluster_together_and_merge_without_error(tokenizer, calib_file):
    model = tiny_model("mixtral")
    with torch.no_grad():
        for view in moe_layer_views(model):
            view.experts.gate_up_proj[5] = view.experts.gate_up_proj[2]
            view.experts.down_proj[5] = view.experts.down_proj[2]
        before = model(_ids()).logits.clone()
    result = moepress.compress(model, "hcsmoe", experts=7, calib=calib_file, samples=4, seq_len=32,
                               tokenizer=tokenizer)
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


def test_config_errors_are_for_people():
    with pytest.raises(ConfigError, match="ward"):
        build_method("hcsmoe", ratio=0.5, linkage="ward", metric="cosine")
    with pytest.raises(ConfigError, match="cluster must be one of"):
        build_method("hcsmoe", ratio=0.5, cluster="hirarchical")
    with pytest.raises(ConfigError, match="metric must be one of"):
        build_method("hcsmoe", ratio=0.5, metric="l1")
