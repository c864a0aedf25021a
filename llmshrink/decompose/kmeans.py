"""1-D k-means of a layer's weights (Deep Compression weight sharing), fast on large layers.

In one dimension a cluster of the nearest-centroid assignment is a contiguous run of the sorted
values, cut at the midpoints between neighbouring centroids. So the weights are sorted once; each
Lloyd iteration then finds the k cuts by binary search and the k cluster means from a prefix sum:
O(k log n) per iteration instead of the O(n k) of a distance matrix (a 1536x576 layer clusters in
well under a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Init = Literal["forgy", "density", "linear"]


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k,) float32, ascending
    assignments: torch.Tensor  # int64, shaped like the input: each value's centroid
    initial: torch.Tensor  # (k,) the starting centroids
    iterations: int  # Lloyd iterations run
    converged: bool  # stopped because no centroid moved more than the tolerance


def initial_centroids(values: torch.Tensor, k: int, init: Init, seed: int = 0) -> torch.Tensor:
    """The k starting centroids (ascending) of Han et al.'s three initialisations.

    forgy: k weights drawn at random without replacement (reproducible from `seed`).
    density: quantiles at the middle of k equal-probability slices of the weights' CDF,
        ((i + 0.5) / k, linearly interpolated), so centroids crowd where the weights are dense.
    linear: k points evenly spaced from the smallest to the largest weight.
    """
    flat = values.detach().reshape(-1).float()
    if init == "forgy":
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randperm(flat.numel(), generator=generator)[:k].to(flat.device)
        return flat[picks].sort().values
    if init == "density":
        ordered = flat.sort().values
        position = (torch.arange(k, dtype=torch.float64) + 0.5) / k * (flat.numel() - 1)
        low = position.floor().long()
        high = (low + 1).clamp(max=flat.numel() - 1)
        frac = (position - low).to(flat.device)
        low, high = low.to(flat.device), high.to(flat.device)
        return (ordered[low].double() * (1 - frac) + ordered[high].double() * frac).float()
    if init == "linear":
        return torch.linspace(float(flat.min()), float(flat.max()), k, device=flat.device)
    raise ValueError(f"init must be forgy, density or linear, got {init!r}")


def kmeans_1d(
    values: torch.Tensor, k: int, init: Init = "linear", iters: int = 300, tol: float = 1e-6, seed: int = 0
) -> KMeansResult:
    """Lloyd's k-means on the scalar values of `values` (any shape); deterministic given `seed`.

    Stops after `iters` iterations, or once no centroid moves more than `tol` times the value range.
    An empty cluster is moved onto the value farthest from its centroid (as scikit-learn does), so k
    distinct values with k clusters always end at zero error.
    """
    flat = values.detach().reshape(-1).float()
    if not 2 <= k <= flat.numel():
        raise ValueError(f"k must be in 2..{flat.numel()} (the number of values), got {k}")
    ordered = flat.sort().values
    # Prefix sums in float64: a cluster's sum is a difference of two large partial sums.
    prefix = torch.cat([ordered.new_zeros(1, dtype=torch.float64), ordered.double().cumsum(0)])
    centroids = initial_centroids(flat, k, init, seed).double()
    initial = centroids.float().clone()
    scale = max(float(ordered[-1] - ordered[0]), 1e-30)
    converged, iterations = False, 0
    while iterations < iters:
        iterations += 1
        ends = _cluster_ends(ordered, centroids)
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        counts = ends - starts
        means = (prefix[ends] - prefix[starts]) / counts.clamp(min=1)
        updated = torch.where(counts > 0, means, centroids)
        if bool((counts == 0).any()):
            updated = _relocate_empty(ordered, centroids, counts, updated)
        updated = updated.sort().values
        shift = float((updated - centroids).abs().max())
        centroids = updated
        if shift <= tol * scale:
            converged = True
            break
    centroids = centroids.float()
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    # A value on a boundary goes to the lower cluster, as in _cluster_ends (right=True there).
    assignments = torch.bucketize(flat, boundaries, right=False).view(values.shape)
    return KMeansResult(centroids, assignments, initial, iterations, converged)


def _cluster_ends(ordered: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """End (exclusive) in the sorted values of each centroid's cluster: cuts at the midpoints."""
    boundaries = ((centroids[1:] + centroids[:-1]) / 2).to(ordered.dtype)
    cuts = torch.searchsorted(ordered, boundaries, right=True)
    return torch.cat([cuts, cuts.new_full((1,), ordered.numel())])


def _relocate_empty(
    ordered: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor, updated: torch.Tensor
) -> torch.Tensor:
    """Move each empty cluster's centroid onto one of the values farthest from their own centroid."""
    empty = (counts == 0).nonzero().flatten()
    own = torch.repeat_interleave(centroids, counts)
    distance = (ordered.double() - own).abs()
    far = distance.topk(empty.numel())  # fewer empty clusters than values, since k <= n
    updated = updated.clone()
    for slot, gap, where in zip(empty.tolist(), far.values.tolist(), far.indices.tolist(), strict=True):
        if gap > 0:  # fewer distinct values than clusters: nothing left to split, keep it where it is
            updated[slot] = ordered[where].double()
    return updated
