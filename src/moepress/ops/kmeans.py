"""K-means grouping of expert features as HC-SMoE's released run scripts execute it.

HC-SMoE's scripts (`scripts/{mixtral,qwen}/run.sh` of github.com/wazenmai/HC-SMoE) pass
`--cluster="hirarchical"`; the grouping code tests for `"hierarchical"`, so the misspelt value
falls through to its K-means branch. That branch is (read in `hcsmoe/merging/clustering.py`):

1. k-means++ initial centres: the first expert uniformly at random, each next one with probability
   proportional to its squared Euclidean distance to the nearest centre chosen so far;
2. Lloyd iterations (at most 100): with `d_ik = ‖f_i − c_k‖₂` the distance of expert i to centre k,
   each column is standardised over the experts, `z_ik = (d_ik − mean_i d_ik) / (std_i d_ik + 1e-6)`
   (unbiased std), and expert i joins `argmin_k z_ik`; centres become the mean of their members;
   stop when no centre coordinate moves by 1e-4 or more.

The standardisation means an expert joins the centre it is *relatively* closest to (compared with
the other experts), not the nearest one: it is what their scripts run, kept here on purpose.
Deviation: an emptied cluster keeps its previous centre; if clusters are still empty at the end,
each takes the expert closest to its centre from a cluster with more than one member, so exactly M
groups always come out. Theirs turns an emptied cluster's centre into NaN (mean of no rows), which
`_standardize`'s global minimum spreads to every distance; the run then stops with an error when it
looks for the expert nearest each cluster's centre. So the two differ only on draws theirs cannot
finish. (Their distances are also divided by the feature dimension and shifted by their minimum:
neither changes the argmin, so neither is reproduced.)
"""

from __future__ import annotations

import torch

from .clustering import canonical_map, trivial_grouping

STD_EPS = 1e-6
CONVERGED = 1e-4


def kmeans_plus_plus_centres(features: torch.Tensor, num_groups: int, generator: torch.Generator) -> list[int]:
    """Indices of `num_groups` k-means++ initial centres among the rows of `features [N, D]`."""
    first = int(torch.randint(0, features.shape[0], (1,), generator=generator))
    centres = [first]
    for _ in range(1, num_groups):
        nearest = torch.cdist(features, features[centres]).min(dim=1).values ** 2
        if float(nearest.sum()) <= 0:  # every expert sits on a centre: pick any unused one
            unused = [j for j in range(features.shape[0]) if j not in centres]
            centres.append(unused[int(torch.randint(0, len(unused), (1,), generator=generator))])
            continue
        centres.append(int(torch.multinomial(nearest / nearest.sum(), 1, generator=generator)))
    return centres


def standardised_assignment(features: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """`argmin_k z_ik` with the column-standardised distances z of the module docstring -> `[N]`."""
    d = torch.cdist(features, centres)
    z = (d - d.mean(dim=0)) / (d.std(dim=0) + STD_EPS)
    return torch.argmin(z, dim=1)


def _fill_empty_clusters(features: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = labels.clone()
    m = centres.shape[0]
    for k in range(m):
        if bool((labels == k).any()):
            continue
        sizes = torch.bincount(labels, minlength=m)
        movable = (sizes[labels] > 1).nonzero().flatten()
        dist = torch.cdist(features[movable], centres[k : k + 1]).flatten()
        labels[movable[int(torch.argmin(dist))]] = k
    return labels


def standardised_kmeans_grouping(features: torch.Tensor, num_groups: int, seed: int = 0,
                                 max_iterations: int = 100) -> torch.Tensor:
    """HC-SMoE's scripted K-means (module docstring) on `features [N, D]` -> canonical expert map `[N]`.

    Args:
        features: one row per expert (HC-SMoE: mean expert output over the calibration tokens).
        num_groups: M, 1 <= M <= N. seed: seeds the k-means++ draws (deterministic per seed).
    """
    trivial = trivial_grouping(features.shape[0], num_groups)
    if trivial is not None:
        return trivial
    x = features.detach().double().flatten(1).cpu()  # [N, D]: a CPU decision (the generator is a CPU one)
    generator = torch.Generator().manual_seed(int(seed))
    centres = x[kmeans_plus_plus_centres(x, num_groups, generator)]
    labels = standardised_assignment(x, centres)
    for _ in range(max_iterations):
        labels = standardised_assignment(x, centres)
        moved = centres.clone()
        for k in range(num_groups):
            members = labels == k
            if bool(members.any()):
                moved[k] = x[members].mean(dim=0)
        shift = float((moved - centres).abs().max())
        centres = moved
        if shift < CONVERGED:
            break
    return canonical_map(_fill_empty_clusters(x, centres, labels))
