"""TensorizedLinear: a linear layer whose weight is a factored tensor (Tucker, CP or tensor-train).

The (out, in) weight W is read as a tensor of shape (o1, ..., op, i1, ..., iq), with
out = o1·…·op and in = i1·…·iq in row-major order (e.g. 1536x576 -> (32, 48, 24, 24)):

    tucker  W = G ×1 U1 ×2 U2 … ×d Ud        core G (r1..rd), factors Uk (nk, rk)
    cp      W = Σ_r λ_r U1[:, r] ∘ … ∘ Ud[:, r] weights λ (R,), factors Uk (nk, R)
    tt      W = G1 G2 … Gd                   cores Gk (r_{k-1}, nk, r_k), r_0 = r_d = 1

Forward, without building W: Tucker contracts the input modes one at a time with their factors,
then the core, then expands through the output factors; CP maps the input onto the R terms with
the Khatri-Rao product of the input factors and back with that of the output factors; TT runs the
input cores right to left down to the bond between the output and input sides, then expands
through the output cores. Each call takes that path unless rebuilding W and one matmul is cheaper
for the number of rows it gets (full ranks, long prompts), counted in multiply-adds.

This file imports only torch: it is copied verbatim into checkpoints as remote code. The
decompositions themselves (tensorly) live in llmshrink/decompose/tensor_factor.py.
"""

from __future__ import annotations

import math
from typing import Sequence  # noqa: UP035 -- remote code may import typing, not collections

import torch
from torch import nn

METHODS = ("tucker", "cp", "tt")


def rank_limits(method: str, dims: Sequence[int]) -> list[int]:
    """The largest meaningful rank per entry of `ranks` (beyond it the decomposition is exact already)."""
    dims = list(dims)
    if method == "tucker":
        return dims
    if method == "tt":
        return [min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims))]
    return [math.prod(dims) // max(dims)]  # cp: one rank-1 term per fibre of the largest mode is exact


def factor_params(method: str, dims: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters the factors hold (bias excluded)."""
    if method == "tucker":
        return math.prod(ranks) + sum(n * r for n, r in zip(dims, ranks, strict=True))
    if method == "cp":
        return ranks[0] * (sum(dims) + 1)
    bonds = [1, *ranks, 1]
    return sum(bonds[k] * n * bonds[k + 1] for k, n in enumerate(dims))


def _apply_modes(t: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """t (N, s1..sm), matrices[k] (sk, s'k) -> (N, s'1..s'm).

    Contracts the last mode and moves the result next to N: after all m modes the order is back.
    """
    for matrix in reversed(matrices):
        t = torch.movedim(torch.matmul(t, matrix), -1, 1)
    return t


def _khatri_rao(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product: (n1, R), (n2, R), ... -> (n1·n2·…, R), row-major like W."""
    out = factors[0]
    for factor in factors[1:]:
        out = (out[:, None, :] * factor[None, :, :]).reshape(-1, out.shape[1])
    return out


class TensorizedLinear(nn.Module):
    """Drop-in replacement for nn.Linear (and GPT-2 Conv1D) with a Tucker/CP/TT-factored weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: str,
        out_shape: Sequence[int],
        in_shape: Sequence[int],
        ranks: Sequence[int],
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        out_shape, in_shape, ranks = [int(n) for n in out_shape], [int(n) for n in in_shape], [int(r) for r in ranks]
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
        if math.prod(out_shape) != out_features or math.prod(in_shape) != in_features or min(out_shape + in_shape) < 1:
            raise ValueError(
                f"tensor shape {out_shape} x {in_shape} gives a {math.prod(out_shape)}x{math.prod(in_shape)} "
                f"weight, layer is {out_features}x{in_features}"
            )
        dims = out_shape + in_shape
        limits = rank_limits(method, dims)
        if len(ranks) != len(limits) or not all(1 <= r <= limit for r, limit in zip(ranks, limits, strict=True)):
            raise ValueError(f"{method} ranks {ranks} do not fit tensor {dims}: each must be in 1..{limits}")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.out_shape, self.in_shape, self.ranks = method, out_shape, in_shape, ranks
        kw = {"device": device, "dtype": dtype}
        if method == "tucker":
            self.core = nn.Parameter(torch.empty(*ranks, **kw))
            self.factors = nn.ParameterList(
                nn.Parameter(torch.empty(n, r, **kw)) for n, r in zip(dims, ranks, strict=True)
            )
        elif method == "cp":
            self.weights = nn.Parameter(torch.empty(ranks[0], **kw))
            self.factors = nn.ParameterList(nn.Parameter(torch.empty(n, ranks[0], **kw)) for n in dims)
        else:
            bonds = [1, *ranks, 1]
            self.cores = nn.ParameterList(
                nn.Parameter(torch.empty(bonds[k], n, bonds[k + 1], **kw)) for k, n in enumerate(dims)
            )
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        for p in self._factor_tensors():
            nn.init.normal_(p, std=0.02)
        # Multiply-adds per input row through the factors, and to rebuild W: they pick the forward path.
        self.macs_per_row, self._rebuild_macs = self._costs()

    @classmethod
    def from_factors(
        cls,
        method: str,
        shape: Sequence[Sequence[int]],
        factors: Sequence[torch.Tensor],
        bias: torch.Tensor | None = None,
    ) -> TensorizedLinear:
        """Build from precomputed factors; shape is (out_shape, in_shape), e.g. ([32, 48], [24, 24]).

        factors: tucker [core, U1..Ud]; cp [weights, U1..Ud]; tt [G1..Gd] (tensorly's layouts).
        """
        out_shape, in_shape = [int(n) for n in shape[0]], [int(n) for n in shape[1]]
        if method == "tucker":
            ranks = list(factors[0].shape)
        elif method == "cp":
            ranks = [factors[0].shape[0]]
        else:
            ranks = [core.shape[2] for core in factors[:-1]]
        like = factors[0]
        layer = cls(
            math.prod(in_shape), math.prod(out_shape), method, out_shape, in_shape, ranks,
            bias=bias is not None, device=like.device, dtype=like.dtype,
        )
        if len(factors) != len(layer._factor_tensors()):
            raise ValueError(f"{method} needs {len(layer._factor_tensors())} factors, got {len(factors)}")
        with torch.no_grad():
            for param, value in zip(layer._factor_tensors(), factors, strict=True):
                if param.shape != value.shape:
                    raise ValueError(f"{method} factor of shape {list(value.shape)}, expected {list(param.shape)}")
                param.copy_(value)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def _factor_tensors(self) -> list[nn.Parameter]:
        """Factors in from_factors order."""
        if self.method == "tucker":
            return [self.core, *self.factors]
        if self.method == "cp":
            return [self.weights, *self.factors]
        return list(self.cores)

    def factor_params(self) -> int:
        return sum(p.numel() for p in self._factor_tensors())

    def _costs(self) -> tuple[int, int]:
        """(multiply-adds per input row of the factored forward, multiply-adds to rebuild W)."""
        p, dims, ranks = len(self.out_shape), self.out_shape + self.in_shape, self.ranks
        out_f, in_f = self.out_features, self.in_features
        if self.method == "cp":
            r = ranks[0]
            return r * (in_f + out_f), r * (in_f + out_f) + r * out_f * in_f
        if self.method == "tucker":
            size, per_row = in_f, 0
            for n, r in reversed(list(zip(dims[p:], ranks[p:], strict=True))):
                per_row += size * r
                size = size // n * r
            a = math.prod(ranks[:p])
            per_row += size * a
            size = a
            for n, r in reversed(list(zip(dims[:p], ranks[:p], strict=True))):
                per_row += size * n
                size = size // r * n
            rebuild, size = 0, math.prod(ranks)
            for n, r in reversed(list(zip(dims, ranks, strict=True))):
                rebuild += size * n
                size = size // r * n
            return per_row, rebuild
        bonds = [1, *ranks, 1]
        per_row, size = 0, in_f
        for k in range(len(dims) - 1, p - 1, -1):  # input cores, right to left
            per_row += size * bonds[k]
            size = size // (dims[k] * bonds[k + 1]) * bonds[k]
        width = 1
        for k in range(p - 1, -1, -1):  # output cores, expanding
            per_row += bonds[k] * dims[k] * bonds[k + 1] * width
            width *= dims[k]
        rebuild, rows = 0, dims[0]
        for k in range(1, len(dims)):
            rebuild += rows * bonds[k] * dims[k] * bonds[k + 1]
            rows *= dims[k]
        return per_row, rebuild

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies."""
        shape = (self.out_features, self.in_features)
        if self.method == "tucker":
            return _apply_modes(self.core[None], [u.T for u in self.factors]).reshape(shape)
        if self.method == "cp":
            p, factors = len(self.out_shape), list(self.factors)
            left, right = _khatri_rao(factors[:p]), _khatri_rao(factors[p:])
            return (left * self.weights) @ right.T
        w = self.cores[0].reshape(-1, self.cores[0].shape[-1])
        for core in list(self.cores)[1:]:
            w = (w @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
        return w.reshape(shape)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def layout_args(self) -> dict:
        """Constructor arguments, as JSON, so a checkpoint can rebuild this layer before loading."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "method": self.method,
            "out_shape": list(self.out_shape),
            "in_shape": list(self.in_shape),
            "ranks": list(self.ranks),
            "bias": self.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.numel() // self.in_features
        dense_macs = self.out_features * self.in_features
        if rows * self.macs_per_row <= self._rebuild_macs + rows * dense_macs:
            y = self._factored(x.reshape(rows, self.in_features)).reshape(*lead, self.out_features)
        else:
            y = torch.matmul(x, self.to_dense().T)
        if self.bias is not None:
            y = y + self.bias
        return y

    def _factored(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, out) through the factors."""
        n, p = x.shape[0], len(self.out_shape)
        # Plain lists: slicing a ParameterList builds a new module on every call.
        if self.method == "cp":
            factors = list(self.factors)
            left, right = _khatri_rao(factors[:p]), _khatri_rao(factors[p:])
            return ((x @ right) * self.weights) @ left.T
        if self.method == "tucker":
            factors = list(self.factors)
            t = _apply_modes(x.reshape(n, *self.in_shape), factors[p:])
            a = math.prod(self.ranks[:p])
            t = t.reshape(n, -1) @ self.core.reshape(a, -1).T
            t = _apply_modes(t.reshape(n, *self.ranks[:p]), [u.T for u in factors[:p]])
            return t.reshape(n, self.out_features)
        cores = list(self.cores)
        t = x.reshape(n, self.in_features, 1)
        for core in reversed(cores[p:]):  # (N, i1..ik·r_k) -> (N, i1..i_{k-1}, r_{k-1})
            r_prev, dim, r_next = core.shape
            t = t.reshape(n, -1, dim * r_next) @ core.reshape(r_prev, dim * r_next).T
        t = t.reshape(n, -1, 1)  # (N, bond between the output and input sides, 1)
        for core in reversed(cores[:p]):  # (N, r_k, width) -> (N, r_{k-1}, o_k·width)
            r_prev, dim, r_next = core.shape
            t = (core.reshape(r_prev * dim, r_next) @ t).reshape(n, r_prev, -1)
        return t.reshape(n, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
            f"shape={self.out_shape}x{self.in_shape}, ranks={self.ranks}"
        )


COMPRESSED = (TensorizedLinear,)
