"""LowRankLinear: a linear layer whose weight is the product of two thin factors.

    W ≈ U V        U: (m, r), V: (r, n)        y = (x Vᵀ) Uᵀ + b

The forward never builds W: it costs r·(m + n) multiply-adds per token instead of m·n, and the layer
holds r·(m + n) weights instead of m·n, which is smaller whenever r < m·n / (m + n).

This file imports only torch: it is copied verbatim into checkpoints as remote code, so that plain
transformers can rebuild the model without llmshrink installed. Decompositions that need more than a
plain SVD (activation-aware whitening, randomized SVD) live in llmshrink/passes/low_rank.py and hand
their factors to `from_factors`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def truncated_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors (U (m, r), V (r, n)) of `weight` in Frobenius norm (Eckart–Young).

    The singular values are split evenly (U·√Σ, √Σ·Vᵀ) so both factors have the same scale, which keeps
    later fine-tuning well conditioned. Computed in float64, returned in the weight's dtype.
    """
    w = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


class LowRankLinear(nn.Module):
    """Drop-in replacement for nn.Linear (and GPT-2 Conv1D) with a rank-r factored weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank {rank} must be between 1 and min({out_features}, {in_features}) = "
                f"{min(in_features, out_features)}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        # The product U V then has the variance of a default nn.Linear weight (1 / in_features).
        nn.init.normal_(self.u, std=rank**-0.5)
        nn.init.normal_(self.v, std=in_features**-0.5)

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int) -> LowRankLinear:
        """Initialise from a dense layer by truncated SVD of its weight.

        Accepts nn.Linear (weight: out x in) and transformers' Conv1D (weight: in x out).
        """
        weight = dense_weight(linear)
        u, v = truncated_svd_factors(weight, rank)
        return cls.from_factors(u, v, getattr(linear, "bias", None))

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """A layer applying W = u @ v (u: out x r, v: r x in), plus `bias` when given."""
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(f"factors must be (out, r) and (r, in), got {tuple(u.shape)} and {tuple(v.shape)}")
        (out_features, rank), in_features = u.shape, v.shape[1]
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            layer.u.copy_(u)
            layer.v.copy_(v)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies; for checks and dense export only."""
        return self.u @ self.v

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=self.u.device, dtype=self.u.dtype)
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
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of nn.Linear or GPT-2 Conv1D (which stores in x out)."""
    if type(layer).__name__ == "Conv1D":
        return layer.weight.detach().T
    return layer.weight.detach()


COMPRESSED = (LowRankLinear,)
