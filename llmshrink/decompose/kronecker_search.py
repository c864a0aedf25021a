"""Row/column permutation search for Kronecker factorisation (TQCompressedGPT-2 style).

Finds P, Q so that the nearest rank-r Kronecker sum K of W[P][:, Q] is closer to it than the one of
W itself. Convention (as KroneckerLinear.from_linear): K approximates W[row_perm][:, col_perm].

Block-coordinate descent, each step optimal for its sub-problem, so the error never increases:
  1. fit K to the permuted W (top-r SVD of the Van Loan rearrangement);
  2. with K fixed, the best row order is a linear assignment, solved exactly:
     max Σ_p <W[row_p, cols], K[p]>   (||W_i - K_p||² = const - 2 <W_i, K_p>);
  3. refit, then the same for the columns; repeat while it gains.
Starts: identity (so the result is never worse than no permutation), rows/columns sorted by norm,
and structured starts. For W = P (A ⊗ B) Q, the Gram matrix of W² (elementwise) is again a permuted
Kronecker product of positive matrices, so its log is additive: log(A²A²ᵀ)[i,i'] + log(B²B²ᵀ)[k,k'].
Two of its rows that share k then differ by a vector that is constant on the row groups i, and
sorting that vector reveals the groups; k-means over all such vectors makes it robust to noise, and
an assignment of every row to an (i, k) slot gives the order. This recovers a permuted Kronecker
product (up to ~10% noise) in one step; on real weights it is just another start for the descent.
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
_EXACT = 1e-6  # relative error below which nothing is left to gain
_MAX_ASSIGN = 4096  # a longer side is not searched: its assignment problem alone would take minutes


@dataclass
class PermutationResult:
    row_perm: torch.Tensor  # (out,) long; K approximates W[row_perm][:, col_perm]
    col_perm: torch.Tensor  # (in,) long
    error: float  # ||W[row_perm][:, col_perm] - K|| / ||W||, K the nearest rank-r Kronecker sum
    error_identity: float  # the same without permutation
    # The final descent's error after each iteration (index 0: its start), from the search's fast
    # fit: non-increasing, and an upper bound on `error`.
    history: list[float] = field(default_factory=list)


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
    iters: int = 20,
    restarts: int = 2,
    seed: int = 0,
    progress: Progress | None = None,
    tol: float = 1e-3,
) -> PermutationResult:
    """Search row/column permutations that lower the nearest Kronecker-sum error of `weight` (out, in).

    Starts: identity, rows/columns sorted by norm, and `restarts` structured starts (log-Gram
    grouping, each from the next strongest reference row/column). The start with the lowest error
    descends for up to `iters` iterations, until an iteration gains less than `tol` (relative).
    Rank r > 1 searches at rank 1 first, then refines at rank r. A side with one factor of size 1
    (every order is equally good) or longer than 4096 is left in place.
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
    sides = (m1 > 1 and m2 > 1 and out_features <= _MAX_ASSIGN, n1 > 1 and n2 > 1 and in_features <= _MAX_ASSIGN)
    if not any(sides) or iters < 1 or error_identity < _EXACT:
        return PermutationResult(*identity, error_identity, error_identity, [error_identity])

    # Rank 1 first, even for a rank-r target: its fit cannot absorb misplaced rows, so the
    # assignments see them clearly; the rank-r descent then refines (from there, or from identity).
    fit1 = _Fitter(w, (m1, n1), (m2, n2), 1, seed)
    by_norm = (
        w.norm(dim=1).argsort(descending=True) if sides[0] else identity[0],
        w.norm(dim=0).argsort(descending=True) if sides[1] else identity[1],
    )
    starts = [identity, by_norm]
    if restarts > 0:
        structured = _Structured(w, fit1, sides)
        for attempt in range(restarts):
            starts.append(structured.start(attempt))
            if fit1.fit(*starts[-1])[1] < _EXACT:
                break
    counter = _Counter(progress, iters + (iters + 1 if rank > 1 else 0))
    best = _best_descent(fit1, starts, sides, iters, tol, counter)
    if rank > 1:
        fitter = _Fitter(w, (m1, n1), (m2, n2), rank, seed)
        # Probe both: the rank-1 optimum is not always the best basin for rank r.
        direct = min(starts[:2], key=lambda order: fitter.fit(*order)[1])
        best = _best_descent(fitter, [(best.rows, best.cols), direct], sides, iters, tol, counter, probe=True)

    rows, cols = best.rows, best.cols
    error = relative_kronecker_error(w[rows][:, cols], (m1, n1), (m2, n2), rank)
    if error > error_identity:  # keep the best: never worse than no permutation
        rows, cols, error = *identity, error_identity
    return PermutationResult(rows, cols, error, error_identity, best.history)


class _Counter:
    """Reports (steps done, steps at most, best error) to the caller's progress callback."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, best: float) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, best)


def _best_descent(
    fitter: _Fitter, starts: list[tuple[torch.Tensor, torch.Tensor]], sides: tuple[bool, bool],
    iters: int, tol: float, counter: _Counter, probe: bool = False,
) -> _Run:
    """Descend from the start with the lowest error (with `probe`: after one iteration from each)
    for up to `iters` iterations, until one gains less than `tol` (relative)."""
    runs = [_Run.start(fitter, *order) for order in starts]
    for run in runs if probe else []:
        if min(r.err for r in runs) >= _EXACT:
            run.step(fitter, sides, tol)
            counter(min(r.err for r in runs))
    best = min(runs, key=lambda run: run.err)
    while len(best.history) <= iters and not best.converged and best.err >= _EXACT:
        best.step(fitter, sides, tol)
        counter(best.err)
    return best


class _Fitter:
    """Nearest rank-r Kronecker sum of a permuted W, by a randomised top-r SVD of the rearrangement.

    K = U Uᵀ R with U orthonormal is the best approximation within span(U); its error is computed
    exactly even though U only approximates the top singular space, and a descent step is kept
    only if that error drops.
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
        # The row Gram holds A²A²ᵀ (rank <= n1) ⊗ B²B²ᵀ (rank <= n2): a rank-1 factor carries
        # no grouping; the columns' likewise with m1, m2.
        shapes = (((m1, m2), (n1 > 1, n2 > 1)), ((n1, n2), (m1 > 1, m2 > 1)))
        for gram, refs, ((g1, g2), informative) in zip(self.grams, self.refs, shapes, strict=True):
            if gram is None:
                options.append([torch.arange(refs.numel())])
                continue
            options.append(_orders(gram, int(refs[attempt % refs.numel()]), g1, g2, informative))
        # Equal group sizes leave which grouping is A's ambiguous: try both, keep the better.
        tried = [(self.fitter.fit(r, c)[1], r, c) for r in options[0] for c in options[1]]
        _, rows, cols = min(tried, key=lambda t: t[0])
        return rows, cols


def _log_gram(sq: torch.Tensor) -> torch.Tensor:
    """log(W² (W²)ᵀ): for W = A ⊗ B this is log(A²A²ᵀ) ⊕ log(B²B²ᵀ), additive like log|W|, but each
    entry is a sum of positive terms, so noise averages out instead of blowing up near zero."""
    gram = sq @ sq.T
    return (gram + 1e-12 * float(gram.max().clamp_min(1e-300))).log()


def _orders(
    gram: torch.Tensor, ref: int, g1: int, g2: int, informative: tuple[bool, bool]
) -> list[torch.Tensor]:
    """Orders of the n = g1·g2 entries (slot = outer·g2 + inner) read off a log-Gram matrix.

    Rows of the Gram that share the inner index differ by a vector that takes g1 values, each g2
    times (the outer groups); sharing the outer index gives g2 values, each g1 times (inner groups).
    A grouping its factor cannot show is read from the entries' strength (Gram diagonal) instead:
    inside one group of the other kind, the entries differ only by that factor's scale.
    """
    if not any(informative):
        return [torch.arange(gram.shape[0])]
    diff = torch.cat([gram[:ref], gram[ref + 1 :]]) - gram[ref]  # the reference is no evidence
    diff = diff - diff.mean(dim=1, keepdim=True)
    strength = gram.diagonal()
    if not informative[0]:
        inner, dist_inner = _grouping(diff, g2, g1, None)
        return [_slots_to_order(_rank_within(inner, strength, g1), dist_inner)]
    outer, dist_outer = _grouping(diff, g1, g2, None)
    if not informative[1]:
        return [_slots_to_order(dist_outer, _rank_within(outer, strength, g2))]
    inner, dist_inner = _grouping(diff, g2, g1, outer)
    orders = [_slots_to_order(dist_outer, dist_inner)]
    if g1 == g2:  # the two groupings may be the other way round
        orders.append(_slots_to_order(dist_inner, dist_outer))
    return orders


def _rank_within(labels: torch.Tensor, strength: torch.Tensor, size: int) -> torch.Tensor:
    """Distances (0 or 1) to labels that rank each entry by strength inside its group."""
    order = torch.argsort(labels * (strength.abs().max() * 4 + 1) + strength)  # by group, then strength
    first = torch.searchsorted(labels[order], labels[order])  # index where each entry's group begins
    rank = torch.empty_like(labels)
    rank[order] = (torch.arange(labels.numel()) - first).clamp(max=size - 1)
    return (rank[:, None] != torch.arange(size)[None]).to(strength.dtype)


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
    """order[slot] = entry, slot = outer·g2 + inner, each entry near both its groups.

    An exact assignment, unless it is large and most entries' nearest slots clash (the groupings
    are noise, and the assignment would take seconds): then the nearest entry keeps each wanted
    slot and only the rest are assigned to the empty slots.
    """
    n = dist_outer.shape[0]
    cost = (dist_outer[:, :, None] + dist_inner[:, None, :]).reshape(n, -1)
    want = dist_outer.argmin(dim=1) * dist_inner.shape[1] + dist_inner.argmin(dim=1)
    if n <= 1024 or torch.unique(want).numel() >= 0.45 * n:
        return _assign(-cost)
    order = torch.full((n,), -1, dtype=torch.long)
    by_cost = cost[torch.arange(n), want].argsort(descending=True)
    order[want[by_cost]] = by_cost  # the last write wins: the nearest entry of each slot
    placed = torch.zeros(n, dtype=torch.bool)
    placed[order[order >= 0]] = True
    free, empty = (~placed).nonzero().flatten(), (order < 0).nonzero().flatten()
    order[empty] = free[_assign(-cost[free][:, empty])]
    return order
