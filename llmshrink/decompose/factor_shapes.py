"""Choose Kronecker factor shapes (A: m1 x n1, B: m2 x n2) and rank for one dense weight (out, in).

The error of the nearest rank-r Kronecker sum comes from the singular values σ of the Van Loan
rearrangement R (m1·n1 x m2·n2): ||W - K||² = Σ_{t>r} σ_t². Candidates are screened with a cheap
randomised estimate of the top-r singular values; the best few get their exact error from svdvals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmshrink.errors import LlmshrinkError

Shape = tuple[int, int]

_SCREENED = 64  # candidates estimated per layer, those using the most of the budget first
_EXACT = 3  # best screened candidates whose error is computed exactly


@dataclass(frozen=True)
class ShapeChoice:
    a_shape: Shape
    b_shape: Shape
    rank: int
    params: int
    rel_error: float  # ||W - K|| / ||W||, K the nearest rank-r Kronecker sum, no permutation


def factor_shape_candidates(out_features: int, in_features: int) -> list[tuple[Shape, Shape]]:
    """All (A, B) shapes with m1·m2 = out, n1·n2 = in that are real Kronecker structure.

    Excluded: a 1x1 factor (no compression) and a column ⊗ a row (or a row ⊗ a column), which is
    just a rank-r matrix, the low-rank pass's business. Most balanced first: factors of similar
    size and similar aspect (the shapes people expect, listed first in hints).
    """
    found = []
    for m1 in _divisors(out_features):
        for n1 in _divisors(in_features):
            m2, n2 = out_features // m1, in_features // n1
            if (m1, n1) == (1, 1) or (m2, n2) == (1, 1) or (n1 == 1 and m2 == 1) or (m1 == 1 and n2 == 1):
                continue
            found.append(((m1, n1), (m2, n2)))
    return sorted(found, key=lambda c: (_imbalance(*c), c))


def kronecker_params(a_shape: Shape, b_shape: Shape, rank: int) -> int:
    (m1, n1), (m2, n2) = a_shape, b_shape
    return rank * (m1 * n1 + m2 * n2)


def kronecker_macs(a_shape: Shape, b_shape: Shape, rank: int) -> int:
    """Multiply-adds per input row of KroneckerLinear's forward (it takes the cheaper order)."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    return rank * min(n1 * n2 * m2 + m1 * n1 * m2, m1 * n1 * n2 + m1 * n2 * m2)


def validate_factor_shapes(out_features: int, in_features: int, a_shape: Shape, b_shape: Shape) -> None:
    """Raise LlmshrinkError (one line, with shapes that would work) unless A ⊗ B tiles the weight."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    if min(m1, n1, m2, n2) >= 1 and m1 * m2 == out_features and n1 * n2 == in_features:
        return
    valid = [a for a, _ in factor_shape_candidates(out_features, in_features)]
    hint = (
        "valid A shapes include " + ", ".join(f"{m}x{n}" for m, n in valid[:6])
        if valid
        else _no_factorisation(out_features, in_features)
    )
    raise LlmshrinkError(
        f"layer {out_features}x{in_features}: factor shapes A={m1}x{n1}, B={m2}x{n2} give a "
        f"{m1 * m2}x{n1 * n2} weight; {hint}"
    )


def choose_factor_shapes(
    weight: torch.Tensor, ratio: float, rank: int | None = None, max_rank: int = 8
) -> ShapeChoice:
    """Lowest-error (A, B, rank) whose params fit ratio·out·in and whose forward is cheaper than dense.

    rank None: each candidate takes the largest rank <= max_rank that fits.
    """
    out_features, in_features = weight.shape
    dense = out_features * in_features
    where = f"layer {out_features}x{in_features}"
    if not ratio > 0:
        raise LlmshrinkError(f"{where}: ratio must be > 0, got {ratio}")
    if (rank is not None and rank < 1) or max_rank < 1:
        raise LlmshrinkError(f"{where}: rank must be >= 1, got {rank if rank is not None else max_rank}")
    candidates = factor_shape_candidates(out_features, in_features)
    if not candidates:
        raise LlmshrinkError(f"{where}: {_no_factorisation(out_features, in_features)}")
    budget = ratio * dense
    feasible: list[tuple[Shape, Shape, int]] = []
    for a, b in candidates:
        ranks = [rank] if rank is not None else range(max_rank, 0, -1)
        fits = [r for r in ranks if kronecker_params(a, b, r) <= budget and kronecker_macs(a, b, r) < dense]
        if fits:
            feasible.append((a, b, fits[0]))
    if not feasible:
        raise LlmshrinkError(f"{where}: {_too_small(candidates, ratio, rank or 1, dense)}")

    w = weight.detach().to(device="cpu", dtype=torch.float32)
    norm2 = float(w.double().pow(2).sum())
    if norm2 == 0:  # every shape is exact for a zero weight: take the smallest
        a, b, r = min(feasible, key=lambda c: kronecker_params(*c))
        return ShapeChoice(a, b, r, kronecker_params(a, b, r), 0.0)
    # Screen those that use most of the budget (more parameters, lower error as a rule), then exact.
    feasible.sort(key=lambda c: (-kronecker_params(*c), _imbalance(c[0], c[1])))
    screened = sorted(feasible[:_SCREENED], key=lambda c: _estimated_error2(w, *c))
    exact = [(_exact_error2(w, *c) / norm2, c) for c in screened[:_EXACT]]
    err2, (a, b, r) = min(exact, key=lambda t: (t[0], kronecker_params(*t[1])))
    return ShapeChoice(a, b, r, kronecker_params(a, b, r), max(err2, 0.0) ** 0.5)


def _rearranged(w: torch.Tensor, a_shape: Shape, b_shape: Shape) -> torch.Tensor:
    (m1, n1), (m2, n2) = a_shape, b_shape
    return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def _exact_error2(w: torch.Tensor, a_shape: Shape, b_shape: Shape, rank: int) -> float:
    s = torch.linalg.svdvals(_rearranged(w, a_shape, b_shape).double())
    return float(s[rank:].pow(2).sum())  # the trailing values themselves: no cancellation


def _estimated_error2(w: torch.Tensor, a_shape: Shape, b_shape: Shape, rank: int) -> float:
    """||R||² minus a randomised estimate of the top-r energy (an upper bound on the true error²)."""
    r = _rearranged(w, a_shape, b_shape)
    if min(r.shape) <= rank + 8:
        top = torch.linalg.svdvals(r)[:rank]
    else:
        generator = torch.Generator().manual_seed(0)  # screening must not depend on global RNG state
        q = torch.linalg.qr(r @ torch.randn(r.shape[1], rank + 6, generator=generator))[0]
        q = torch.linalg.qr(r @ (r.T @ q))[0]  # one power step sharpens flat spectra enough to rank
        top = torch.linalg.svdvals(q.T @ r)[:rank]
    return float(r.double().pow(2).sum()) - float(top.double().pow(2).sum())


def _too_small(candidates: list[tuple[Shape, Shape]], ratio: float, rank: int, dense: int) -> str:
    runnable = [(a, b) for a, b in candidates if kronecker_macs(a, b, rank) < dense]
    if not runnable:
        return f"no factor shapes at rank {rank} run faster than the dense layer; lower the rank"
    a, b = min(runnable, key=lambda c: kronecker_params(c[0], c[1], rank))
    smallest = kronecker_params(a, b, rank) / dense
    return (
        f"ratio {ratio:g} too small; smallest possible is {smallest:.4g} with "
        f"A={a[0]}x{a[1]}, B={b[0]}x{b[1]} at rank {rank}"
    )


def _no_factorisation(out_features: int, in_features: int) -> str:
    dims = f"{out_features} and {in_features}"
    why = "are prime" if _is_prime(out_features) and _is_prime(in_features) else "are each 1 or prime"
    return f"no Kronecker factorisation (both factors larger than 1x1) exists: {dims} {why}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def _imbalance(a_shape: Shape, b_shape: Shape) -> float:
    (m1, n1), (m2, n2) = a_shape, b_shape
    return abs(math.log(m1 * n1 / (m2 * n2))) + abs(math.log(m1 / n1) - math.log(m2 / n2))
