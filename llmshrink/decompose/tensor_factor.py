"""Tensor shapes, ranks and decompositions (tensorly) for TensorizedLinear.

A dense (out, in) weight is read as the tensor (o1, .., op, i1, .., iq) and decomposed by Tucker
(HOOI from a truncated HOSVD), CP (ALS) or tensor-train (TT-SVD), with tensorly on its pytorch
backend (inside a context, so other code keeps its backend). Randomised SVD is the fast option.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from llmshrink.errors import LlmshrinkError
from llmshrink.modules.tensorized import factor_params, rank_limits

RANK_ENTRIES = {"tucker": "one per mode", "cp": "one", "tt": "one per bond between neighbouring modes"}


def balanced_factors(n: int, parts: int) -> list[int] | None:
    """`parts` factors > 1 of n, ascending, with the smallest largest factor; None when n has too few primes."""
    if parts == 1:
        return [n] if n > 1 else None

    best: list[int] | None = None

    def search(rest: int, left: int, low: int, chosen: list[int]) -> None:
        nonlocal best
        if left == 1:
            if rest >= low:
                found = [*chosen, rest]
                if best is None or (max(found), found[::-1]) < (max(best), best[::-1]):
                    best = found
            return
        d = low
        while d ** left <= rest:  # ascending factors: the others are all >= d
            if rest % d == 0:
                search(rest // d, left - 1, d, [*chosen, d])
            d += 1

    search(n, parts, 2, [])
    return best


def _prime_factors(n: int) -> list[int]:
    found, d = [], 2
    while d * d <= n:
        while n % d == 0:
            found.append(d)
            n //= d
        d += 1
    return found + ([n] if n > 1 else [])


def tensor_shape(
    out_features: int,
    in_features: int,
    modes_per_side: int,
    shape: Sequence[Sequence[int]] | dict[int, Sequence[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """(out_shape, in_shape): explicit (a pair for this layer, or {dimension: factors}) or balanced."""
    if shape is not None and not isinstance(shape, dict):
        out_shape, in_shape = [int(n) for n in shape[0]], [int(n) for n in shape[1]]
        if math.prod(out_shape) != out_features or math.prod(in_shape) != in_features:
            raise LlmshrinkError(
                f"shape {[out_shape, in_shape]} gives a {math.prod(out_shape)}x{math.prod(in_shape)} weight, "
                f"layer is {out_features}x{in_features}; give a mapping {{dimension: factors}} for layers of "
                "different shapes"
            )
        return out_shape, in_shape
    mapping = shape or {}
    sides = []
    for side, n in (("out_features", out_features), ("in_features", in_features)):
        if n in mapping:
            sides.append([int(f) for f in mapping[n]])
            continue
        factors = balanced_factors(n, modes_per_side)
        if factors is None:
            primes = " x ".join(map(str, _prime_factors(n))) or "1"
            raise LlmshrinkError(
                f"{side} {n} cannot split into {modes_per_side} factors > 1 ({n} = {primes}); "
                f"set shape: {{{n}: [{n}]}} to keep it one mode, or exclude the layer"
            )
        sides.append(factors)
    return sides[0], sides[1]


def choose_ranks(
    method: str, dims: Sequence[int], rank: int | Sequence[int] | None, ratio: float | None
) -> list[int]:
    """Ranks from `rank` (an int caps every entry; a list is taken as given) or the largest uniform
    rank whose factors fit ratio·(dense params)."""
    limits = rank_limits(method, dims)
    if isinstance(rank, int):
        return [min(rank, limit) for limit in limits]
    if rank is not None:
        ranks = [int(r) for r in rank]
        if len(ranks) != len(limits):
            raise LlmshrinkError(
                f"rank {ranks} has {len(ranks)} entries; {method} on the {len(dims)}-mode tensor {list(dims)} "
                f"needs {len(limits)} ({RANK_ENTRIES[method]})"
            )
        for k, (r, limit) in enumerate(zip(ranks, limits, strict=True)):
            if r > limit:
                what = {"tucker": f"mode {k} has size {limit}", "cp": f"rank {limit} is exact already",
                        "tt": f"bond {k} allows at most {limit}"}[method]
                raise LlmshrinkError(f"{method} rank {ranks} is too large for tensor {list(dims)}: {what}")
        if method == "tt":  # TT-SVD cannot give bond k more than (bond k-1) x (mode k)
            for k in range(1, len(ranks)):
                if ranks[k] > ranks[k - 1] * dims[k]:
                    raise LlmshrinkError(
                        f"tt rank {ranks} is too large for tensor {list(dims)}: bond {k} allows at most "
                        f"{ranks[k - 1]} x {dims[k]} = {ranks[k - 1] * dims[k]} after bond {k - 1}"
                    )
        return ranks
    budget = int(ratio * math.prod(dims))

    def params(r: int) -> int:
        return factor_params(method, dims, [min(r, limit) for limit in limits])

    if params(1) > budget:
        raise LlmshrinkError(
            f"ratio {ratio} allows {budget} parameters; {method} on tensor {list(dims)} needs {params(1)} at rank 1"
        )
    low, high = 1, max(limits)  # params grows with r: largest r within budget by bisection
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if params(mid) <= budget else (low, mid - 1)
    return [min(low, limit) for limit in limits]


def decompose(
    weight: torch.Tensor,
    method: str,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    ranks: Sequence[int],
    randomized: bool = False,
    n_iter_max: int = 100,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Factors of `weight` (out, in) in TensorizedLinear.from_factors order, in float32."""
    import tensorly as tl
    from tensorly.decomposition import parafac, tensor_train, tucker

    dims = [*out_shape, *in_shape]
    tensor = weight.detach().to(torch.float32).reshape(dims)
    svd = "randomized_svd" if randomized else "truncated_svd"
    with tl.backend_context("pytorch", local_threadsafe=True):
        if method == "tucker":
            core, factors = tucker(tensor, rank=list(ranks), n_iter_max=n_iter_max, svd=svd, random_state=seed)
            return [core, *factors]
        if method == "cp":
            if ranks[0] >= rank_limits("cp", dims)[0]:
                return exact_cp(tensor)
            with warnings.catch_warnings():  # svd init with more terms than a mode's size pads at random
                warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
                weights, factors = parafac(
                    tensor, ranks[0], n_iter_max=n_iter_max, init="random" if randomized else "svd", svd=svd,
                    normalize_factors=True, random_state=seed,
                )
            return [weights, *factors]
        return list(tensor_train(tensor, rank=[1, *ranks, 1], svd=svd, random_state=seed).factors)


def exact_cp(tensor: torch.Tensor) -> list[torch.Tensor]:
    """An exact CP decomposition: one term per fibre along the largest mode (one-hot elsewhere)."""
    dims = list(tensor.shape)
    big = dims.index(max(dims))
    others = [n for k, n in enumerate(dims) if k != big]
    fibres = torch.movedim(tensor, big, -1).reshape(-1, dims[big])  # rows: other modes, row-major
    index = iter(torch.unravel_index(torch.arange(fibres.shape[0], device=tensor.device), others))
    factors = []
    for k, n in enumerate(dims):
        if k == big:
            factors.append(fibres.T.contiguous())
        else:
            factors.append(torch.nn.functional.one_hot(next(index), n).T.to(tensor.dtype))
    return [torch.ones(fibres.shape[0], dtype=tensor.dtype, device=tensor.device), *factors]
