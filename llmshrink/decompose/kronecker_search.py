"""Row/column permutation search for Kronecker factorisation (TQCompressedGPT-2 style).

Finds P, Q so that the nearest rank-r Kronecker sum K of W[P][:, Q] is closer to it than the one of
W itself. Convention (as KroneckerLinear.from_linear): K approximates W[row_perm][:, col_perm].

Block-coordinate descent, each step optimal for its sub-problem, so the error never increases:
  1. fit K to the permuted W (top-r SVD of the Van Loan rearrangement);
  2. with K fixed, the best row order is a linear assignment:
     max Σ_p <W[row_p, cols], K[p]>  (||W_i - K_p||² = const - 2 <W_i, K_p>), solved exactly;
  3. refit, then the same for the columns; repeat until nothing improves.
Starts: identity (so the result is never worse than no permutation) and structured starts read off
log|W|: for W = P (A ⊗ B) Q, log|W| = log|A|[i,j] + log|B|[k,l], so the difference of two rows that
share k is constant on each column group j (and on each group l when they share i). Sorting such
a difference vector reveals the column groups; two transversal groupings give every column its
(j, l) label, and likewise for rows. This recovers an exactly permuted Kronecker product in one
step; on real weights it is just another start for the descent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from llmshrink.modules.kronecker import kronecker_sum, nearest_kronecker

Shape = tuple[int, int]
Progress = Callable[[int, int, float], None]  # (steps done, steps at most, best error so far)

_SMALL = 1 << 16  # problems up to this many weights run in float64
_TOP_CANDIDATES = 32
_EXACT = 1e-6  # relative error below which nothing is left to gain  # difference vectors checked for a transversal second grouping


@dataclass
class PermutationResult:
    row_perm: torch.Tensor  # (out,) long; K approximates W[row_perm][:, col_perm]
    col_perm: torch.Tensor  # (in,) long
    error: float  # ||W[row_perm][:, col_perm] - K|| / ||W||, K the nearest rank-r Kronecker sum
    error_identity: float  # the same without permutation
    history: list[float] = field(default_factory=list)  # winning start: error after each iteration


def relative_kronecker_error(weight: torch.Tensor, a_shape: Shape, b_shape: Shape, rank: int = 1) -> float:
    """||W - K|| / ||W|| for K = nearest_kronecker(W) (exact SVD, as from_linear uses)."""
    w = weight.detach().to(torch.float64)
    a, b = nearest_kronecker(w, a_shape, b_shape, rank)
    k = kronecker_sum(a.to(torch.float64), b.to(torch.float64))
    norm = float(w.norm())
    return float((w - k).norm()) / norm if norm > 0 else 0.0


def search_permutations(
    weight: torch.Tensor,
    a_shape: Shape,
    b_shape: Shape,
    rank: int = 1,
    iters: int = 8,
    restarts: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
    tol: float = 1e-3,
) -> PermutationResult:
    """Search row/column permutations that lower the nearest Kronecker-sum error of `weight` (out, in).

    Starts: identity, rows/columns sorted by norm, and `restarts` structured starts (log-Gram
    grouping, each from a different reference). Every start gets one descent iteration; the best
    continues up to `iters` iterations, until an iteration gains less than `tol` (relative).
    """
    (m1, n1), (m2, n2) = tuple(a_shape), tuple(b_shape)
    out_features, in_features = weight.shape
    if m1 * m2 != out_features or n1 * n2 != in_features:
        raise ValueError(f"factor shapes {m1}x{n1} ⊗ {m2}x{n2} do not tile a {out_features}x{in_features} weight")
    dtype = torch.float64 if weight.numel() <= _SMALL else torch.float32
    w = weight.detach().to(device="cpu", dtype=dtype)
    identity = (torch.arange(out_features), torch.arange(in_features))
    error_identity = relative_kronecker_error(w, (m1, n1), (m2, n2), rank)
    # A factor with one row (column) makes every row (column) order equally good: skip that side.
    sides = (m1 > 1 and m2 > 1, n1 > 1 and n2 > 1)
    if not any(sides) or iters < 1 or error_identity < _EXACT:
        return PermutationResult(*identity, error_identity, error_identity, [error_identity])

    fitter = _Fitter(w, (m1, n1), (m2, n2), rank, seed)
    norms = (w.norm(dim=1).argsort(descending=True), w.norm(dim=0).argsort(descending=True))
    orders = [identity, tuple(o if side else i for o, i, side in zip(norms, identity, sides, strict=True))]
    runs = [_Run.start(fitter, *order) for order in orders]
    structured = _Structured(w, fitter, sides) if restarts > 0 else None
    for attempt in range(restarts):
        if structured is None or min(run.err for run in runs) < _EXACT:
            break
        runs.append(_Run.start(fitter, *structured.start(attempt)))
    total, done = len(runs) + iters - 1, 0
    for run in runs:  # one iteration each: most of the gain comes in the first
        if min(r.err for r in runs) < _EXACT:
            break
        run.step(fitter, sides, tol)
        done += 1
        if progress is not None:
            progress(done, total, min(r.err for r in runs))
    best = min(runs, key=lambda run: run.err)
    while len(best.history) <= iters and not best.converged and best.err >= _EXACT:
        best.step(fitter, sides, tol)
        done += 1
        if progress is not None:
            progress(done, total, best.err)

    rows, cols = best.rows, best.cols
    error = relative_kronecker_error(w[rows][:, cols], (m1, n1), (m2, n2), rank)
    if error > error_identity:  # keep the best: never worse than no permutation
        rows, cols, error = *identity, error_identity
    return PermutationResult(rows, cols, error, error_identity, best.history)


class _Fitter:
    """Nearest rank-r Kronecker sum of a permuted W, by a randomised top-r SVD of the rearrangement.

    K = U Uᵀ R with U orthonormal is the best approximation within span(U), so its error is exact
    and no worse than the starting state's even when U is only near the top singular space.
    """

    def __init__(self, w: torch.Tensor, a_shape: Shape, b_shape: Shape, rank: int, seed: int):
        self.w, self.a_shape, self.b_shape, self.rank = w, a_shape, b_shape, rank
        self.norm2 = float(w.double().pow(2).sum())
        self.gen = torch.Generator().manual_seed(seed)

    def fit(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, float]:
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        wp = self.w[rows][:, cols]
        r = wp.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
        k = min(self.rank, *r.shape)
        if min(r.shape) <= 4 * (k + 8):
            u = torch.linalg.svd(r, full_matrices=False)[0][:, :k]
        else:
            u = self._top_left(r, k)
        fitted = u @ (u.T @ r)
        err2 = float((r - fitted).double().pow(2).sum())  # the residual, not ||R||² - ||UᵀR||²: no cancellation
        approx = fitted.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)
        return approx, (err2 / self.norm2) ** 0.5 if self.norm2 > 0 else 0.0

    def _top_left(self, r: torch.Tensor, k: int) -> torch.Tensor:
        # Subspace iteration with oversampling: a few matrix products instead of a full SVD.
        q = torch.randn(r.shape[1], k + 8, generator=self.gen, dtype=r.dtype)
        y = torch.linalg.qr(r @ q)[0]
        for _ in range(4):
            y = torch.linalg.qr(r @ torch.linalg.qr(r.T @ y)[0])[0]
        small = torch.linalg.svd(y.T @ r, full_matrices=False)[0]
        return y @ small[:, :k]


@dataclass
class _Run:
    """One descent: the current orders, their fitted K and its error, and the error history."""

    rows: torch.Tensor
    cols: torch.Tensor
    k: torch.Tensor
    err: float
    history: list[float]
    converged: bool = False

    @classmethod
    def start(cls, fitter: _Fitter, rows: torch.Tensor, cols: torch.Tensor) -> _Run:
        k, err = fitter.fit(rows, cols)
        return cls(rows, cols, k, err, [err])

    def step(self, fitter: _Fitter, sides: tuple[bool, bool], tol: float) -> None:
        """Row assignment, refit, column assignment, refit; each kept only if it lowers the error."""
        before = self.err
        if sides[0]:  # row i of W (columns in current order) to slot p: profit <W[i, cols], K[p]>
            self._accept(fitter, _assign(fitter.w[:, self.cols] @ self.k.T), self.cols)
        if sides[1]:
            self._accept(fitter, self.rows, _assign(fitter.w[self.rows].T @ self.k))
        self.history.append(self.err)
        self.converged = before - self.err <= tol * before

    def _accept(self, fitter: _Fitter, rows: torch.Tensor, cols: torch.Tensor) -> None:
        k, err = fitter.fit(rows, cols)
        if err < self.err:
            self.rows, self.cols, self.k, self.err = rows, cols, k, err


def _assign(profit: torch.Tensor) -> torch.Tensor:
    """perm with perm[slot] = item maximising Σ profit[item, slot] (exact linear assignment)."""
    items, slots = linear_sum_assignment(profit.double().numpy(), maximize=True)
    perm = np.empty_like(items)
    perm[slots] = items
    return torch.from_numpy(perm).long()


class _Structured:
    """Structured starts read off log-Gram matrices (exact for a permuted Kronecker product, see top)."""

    def __init__(self, w: torch.Tensor, fitter: _Fitter, sides: tuple[bool, bool]):
        self.fitter, self.sides = fitter, sides
        sq = w.to(torch.float64).pow(2)
        self.grams = [_log_gram(sq) if sides[0] else None, _log_gram(sq.T) if sides[1] else None]
        # References: the strongest rows/columns first (their Gram entries carry the least noise).
        self.refs = [sq.sum(dim=1).argsort(descending=True), sq.sum(dim=0).argsort(descending=True)]

    def start(self, attempt: int) -> tuple[torch.Tensor, torch.Tensor]:
        (m1, n1), (m2, n2) = self.fitter.a_shape, self.fitter.b_shape
        options: list[list[torch.Tensor]] = []
        for gram, refs, (g1, g2) in zip(self.grams, self.refs, ((m1, m2), (n1, n2)), strict=True):
            if gram is None:
                options.append([torch.arange(refs.numel())])
                continue
            ref = int(refs[attempt % refs.numel()])
            # Rows of the Gram sharing the inner index (B's) differ by a vector constant on the outer groups.
            options.append(_orders(gram, ref, g1, g2))
        # Equal group sizes leave which grouping is A's ambiguous: try both, keep the better.
        tried = [(self.fitter.fit(r, c)[1], r, c) for r in options[0] for c in options[1]]
        _, rows, cols = min(tried, key=lambda t: t[0])
        return rows, cols


def _log_gram(sq: torch.Tensor) -> torch.Tensor:
    """log(W² (W²)ᵀ): for W = A ⊗ B this is log(A²A²ᵀ) ⊕ log(B²B²ᵀ), additive like log|W|, but each
    entry is a sum of positive terms, so noise averages out instead of blowing up near zero."""
    gram = sq @ sq.T
    return (gram + 1e-12 * float(gram.max().clamp_min(1e-300))).log()


def _orders(vectors: torch.Tensor, ref: int, g1: int, g2: int) -> list[torch.Tensor]:
    """Orders of the n = g1·g2 entries of `vectors`' rows (one per reading of the groups).

    The difference of two rows of `vectors` that share the inner index takes g1 values, each g2
    times (outer groups); sharing the outer index gives g2 values, each g1 times (inner groups).
    """
    diff = torch.cat([vectors[:ref], vectors[ref + 1 :]]) - vectors[ref]  # the reference is no evidence
    diff = diff - diff.mean(dim=1, keepdim=True)
    outer, dist_outer = _grouping(diff, g1, g2, None)
    inner, dist_inner = _grouping(diff, g2, g1, outer)
    orders = [_slots_to_order(dist_outer, dist_inner)]
    if g1 == g2:  # the two groupings may be the other way round
        orders.append(_slots_to_order(dist_inner, dist_outer))
    return orders


def _grouping(
    diff: torch.Tensor, groups: int, size: int, avoid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (n,) into `groups` groups of `size`, and each entry's squared distance to each group.

    Seeded by the difference vector whose sorted values split best into `groups` equal runs, then
    refined k-means style on the `groups - 1` vectors that this grouping explains best: one noisy
    vector is fragile, their combination is not.
    """
    score = _run_ratio(diff, groups, size)
    if avoid is not None:  # vectors that follow the other grouping say nothing about this one
        score = torch.where(_within_ratio(diff, avoid) < 0.5, torch.inf, score)
    elif groups != size:  # a vector with fewer distinct values can split into runs too: not that one
        score = score / _run_ratio(diff, size, groups).clamp_min(1e-12)
    seed = int(score.nan_to_num(torch.inf).argmin())
    labels = torch.empty(diff.shape[1], dtype=torch.long)
    labels[diff[seed].argsort()] = torch.arange(groups).repeat_interleave(size)
    for _ in range(4):
        explained = _within_ratio(diff, labels).nan_to_num(torch.inf)
        points = diff[explained.argsort()[: min(max(groups - 1, 1), 64)]].T  # (n, T)
        centres = torch.zeros(groups, points.shape[1], dtype=points.dtype).index_add_(0, labels, points)
        centres /= torch.bincount(labels, minlength=groups).clamp_min(1)[:, None]
        dist = torch.cdist(points, centres).pow(2)
        labels = dist.argmin(dim=1)
    return labels, dist / dist.mean().clamp_min(1e-300)


def _run_ratio(diff: torch.Tensor, groups: int, size: int) -> torch.Tensor:
    """Per vector: variance left inside `groups` consecutive runs of its sorted values (0 to 1)."""
    runs = diff.sort(dim=1).values.reshape(-1, groups, size)
    within = (runs - runs.mean(dim=2, keepdim=True)).pow(2).sum(dim=(1, 2))
    return within / diff.pow(2).sum(dim=1)


def _within_ratio(diff: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per vector (centred): variance left inside the groups given by `labels` (0 to 1)."""
    groups = int(labels.max()) + 1
    sums = torch.zeros(diff.shape[0], groups, dtype=diff.dtype).index_add_(1, labels, diff)
    between = (sums.pow(2) / torch.bincount(labels, minlength=groups).clamp_min(1)).sum(dim=1)
    total = diff.pow(2).sum(dim=1)
    return 1 - between / total


def _slots_to_order(dist_outer: torch.Tensor, dist_inner: torch.Tensor) -> torch.Tensor:
    """order[slot] = entry, slot = outer·g2 + inner, each entry in the slot nearest both its groups."""
    cost = (dist_outer[:, :, None] + dist_inner[:, None, :]).reshape(dist_outer.shape[0], -1)
    return _assign(-cost)
