"""KroneckerLinear: a linear layer whose weight is a sum of Kronecker products, optionally permuted.

    W ≈ P (Σ_{i=1..r} A_i ⊗ B_i) Q        A_i: (m1, n1), B_i: (m2, n2), m = m1·m2, n = n1·n2

P and Q are fixed row/column permutations (KnGPT-2 without them, TQCompressedGPT-2 with them).
The forward never builds W: with the input reshaped to X (n1, n2), one term is A · X · Bᵀ, so the
layer costs r·(n·m2 + m1·n1·m2) multiply-adds instead of m·n.

This file imports only torch: it is copied verbatim into checkpoints as remote code, so that plain
transformers can rebuild the model without llmshrink installed.
"""

from __future__ import annotations

import torch
from torch import nn


def nearest_kronecker(weight: torch.Tensor, a_shape, b_shape, rank: int = 1):
    """Best rank-r Kronecker sum of `weight` (out, in) in Frobenius norm (Van Loan–Pitsianis).

    Rearranges W so that each (m2, n2) block becomes one row, then takes a truncated SVD.
    Returns A (r, m1, n1) and B (r, m2, n2) with the singular values split evenly between them.
    """
    (m1, n1), (m2, n2) = a_shape, b_shape
    w = weight.detach().to(torch.float32)
    rearranged = w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    u, s, vh = torch.linalg.svd(rearranged, full_matrices=False)
    k = min(rank, s.numel())  # terms beyond the rearrangement's rank are zero
    root = s[:k].sqrt()
    a = torch.zeros(rank, m1, n1, dtype=w.dtype, device=w.device)
    b = torch.zeros(rank, m2, n2, dtype=w.dtype, device=w.device)
    a[:k] = (u[:, :k] * root).T.reshape(k, m1, n1)
    b[:k] = (vh[:k].T * root).T.reshape(k, m2, n2)
    return a, b


def kronecker_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_i A_i ⊗ B_i as a dense (m1·m2, n1·n2) matrix."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return torch.einsum("rij,rkl->ikjl", a, b).reshape(m1 * m2, n1 * n2)


class KroneckerLinear(nn.Module):
    """Drop-in replacement for nn.Linear (and GPT-2 Conv1D) with a Kronecker-factored weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        a_shape: tuple[int, int] | list[int],
        b_shape: tuple[int, int] | list[int],
        rank: int = 1,
        bias: bool = True,
        permuted: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        (m1, n1), (m2, n2) = tuple(a_shape), tuple(b_shape)
        if m1 * m2 != out_features or n1 * n2 != in_features:
            raise ValueError(
                f"factor shapes {m1}x{n1} ⊗ {m2}x{n2} give a {m1 * m2}x{n1 * n2} weight, "
                f"layer is {out_features}x{in_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.a_shape, self.b_shape, self.rank = (m1, n1), (m2, n2), rank
        self.permuted = permuted
        kw = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.b = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        if permuted:
            # in_index gathers the input columns; out_index gathers the output rows back into place.
            self.register_buffer("in_index", torch.arange(in_features, device=device))
            self.register_buffer("out_index", torch.arange(out_features, device=device))
        # Multiply in the cheaper order (chosen once, from the shapes).
        self._input_side_first = n1 * n2 * m2 + m1 * n1 * m2 <= m1 * n1 * n2 + m1 * n2 * m2
        nn.init.normal_(self.a, std=(1.0 / n1) ** 0.5)
        nn.init.normal_(self.b, std=(1.0 / n2) ** 0.5)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        a_shape,
        b_shape,
        rank: int = 1,
        row_perm: torch.Tensor | None = None,
        col_perm: torch.Tensor | None = None,
    ) -> KroneckerLinear:
        """Initialise from a dense layer by nearest Kronecker product of W[row_perm][:, col_perm].

        Accepts nn.Linear (weight: out x in) and transformers' Conv1D (weight: in x out).
        """
        weight = dense_weight(linear)
        out_features, in_features = weight.shape
        permuted = row_perm is not None or col_perm is not None
        rows = torch.arange(out_features) if row_perm is None else torch.as_tensor(row_perm)
        cols = torch.arange(in_features) if col_perm is None else torch.as_tensor(col_perm)
        a, b = nearest_kronecker(weight[rows][:, cols], a_shape, b_shape, rank)
        bias = getattr(linear, "bias", None)
        layer = cls(
            in_features, out_features, a_shape, b_shape, rank,
            bias=bias is not None, permuted=permuted, device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.a.copy_(a)
            layer.b.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias.detach())
            if permuted:
                layer.in_index.copy_(cols)
                layer.out_index.copy_(torch.argsort(rows))
        return layer

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies; for checks and dense export only."""
        k = kronecker_sum(self.a, self.b)
        if self.permuted:
            k = k[self.out_index][:, torch.argsort(self.in_index)]
        return k

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
            "a_shape": list(self.a_shape),
            "b_shape": list(self.b_shape),
            "rank": self.rank,
            "bias": self.bias is not None,
            "permuted": self.permuted,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (m1, n1), (m2, n2), r = self.a_shape, self.b_shape, self.rank
        if self.permuted:
            x = _gather_last(x, self.in_index)
        lead = x.shape[:-1]
        xs = x.reshape(-1, n1, n2)
        # Plain matmuls with the terms stacked (einsum's planning costs more than the math at decode).
        if self._input_side_first:
            t = torch.matmul(xs, self.b.reshape(r * m2, n2).T)  # X·B_iᵀ for all i: (N, n1, r·m2)
            t = t.reshape(-1, n1, r, m2).transpose(1, 2).reshape(-1, r * n1, m2)
            y = torch.matmul(self.a.transpose(0, 1).reshape(m1, r * n1), t)  # Σ_i A_i·(X·B_iᵀ)
        else:
            t = torch.matmul(self.a.reshape(r * m1, n1), xs)  # A_i·X for all i: (N, r·m1, n2)
            t = t.reshape(-1, r, m1, n2).transpose(1, 2).reshape(-1, m1, r * n2)
            y = torch.matmul(t, self.b.transpose(1, 2).reshape(r * n2, m2))  # Σ_i (A_i·X)·B_iᵀ
        y = y.reshape(*lead, m1 * m2)
        if self.permuted:
            y = _gather_last(y, self.out_index)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"A={m1}x{n1}, B={m2}x{n2}, rank={self.rank}, permuted={self.permuted}"
        )


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of nn.Linear or GPT-2 Conv1D (which stores in x out)."""
    if type(layer).__name__ == "Conv1D":
        return layer.weight.detach().T
    return layer.weight.detach()


def _gather_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[..., index], through gather (measured faster than index_select on the last dim on CPU)."""
    return torch.gather(x, -1, index.expand(*x.shape[:-1], index.numel()))


COMPRESSED = (KroneckerLinear,)
