"""LowRankEmbedding: an embedding table stored as the product of two thin factors (ALBERT's factorisation).

    E ≈ A B        A: (V, r) "table", B: (r, H) "proj"        embed(ids) = A[ids] B

A lookup gathers r numbers per token and multiplies them by B (r·H multiply-adds per token, where the dense
table costs none); the layer holds r·(V + H) weights instead of V·H, which is smaller whenever
r < V·H / (V + H). For BERT's 30,522 x 384 word table, rank 64 keeps 2.0M of its 11.7M weights.

The padding row (padding_idx) of A is zero whenever the dense table's was (as nn.Embedding keeps it), so
padding tokens still embed to exactly zero, and, as in nn.Embedding, that row gets no gradient.

This file imports only torch: it is copied verbatim into checkpoints as remote code, so that plain
transformers can rebuild the model without llmshrink installed. The low_rank pass
(llmshrink/passes/low_rank.py) chooses the rank and hands its SVD factors to `from_factors`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankEmbedding(nn.Module):
    """Drop-in replacement for a plain nn.Embedding with a rank-r factored table."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 1 <= rank <= min(num_embeddings, embedding_dim):
            raise ValueError(
                f"rank {rank} must be between 1 and min({num_embeddings}, {embedding_dim}) = "
                f"{min(num_embeddings, embedding_dim)}"
            )
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        if padding_idx is not None and not 0 <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx {padding_idx} is not a row of a {num_embeddings}-row table")
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        kw = {"device": device, "dtype": dtype}
        self.table = nn.Parameter(torch.empty(num_embeddings, rank, **kw))
        self.proj = nn.Parameter(torch.empty(rank, embedding_dim, **kw))
        # The product A B then has unit-variance entries, as a default nn.Embedding's table.
        nn.init.normal_(self.table, std=rank**-0.5)
        nn.init.normal_(self.proj)
        if padding_idx is not None:
            with torch.no_grad():
                self.table[padding_idx].zero_()

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, rank: int, randomized: bool = False, oversample: int = 10, power_iters: int = 2
    ) -> LowRankEmbedding:
        """Initialise from a dense nn.Embedding by truncated SVD of its (V, H) table (Eckart–Young).

        The singular values are split evenly, A = U_r √Σ_r and B = √Σ_r V_rᵀ, as LowRankLinear does. With
        `randomized`, torch.svd_lowrank (sketch of rank + oversample columns, power_iters subspace iterations;
        it draws from torch's global generator) replaces the full SVD. Computed in float64.
        """
        weight = embedding.weight.detach().to(torch.float64)
        if randomized:
            q = min(rank + oversample, *weight.shape)
            u, s, v = torch.svd_lowrank(weight, q=q, niter=power_iters)
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = s[:rank].sqrt()
        a, b = u[:, :rank] * root, root[:, None] * vh[:rank]
        dtype = embedding.weight.dtype
        return cls.from_factors(a.to(dtype), b.to(dtype), padding_row_zero(embedding))

    @classmethod
    def from_factors(cls, table: torch.Tensor, proj: torch.Tensor, padding_idx: int | None = None) -> LowRankEmbedding:
        """A layer embedding row i as table[i] @ proj (table: V x r, proj: r x H); the padding row of `table`
        is set to zero."""
        if table.dim() != 2 or proj.dim() != 2 or table.shape[1] != proj.shape[0]:
            raise ValueError(f"factors must be (V, r) and (r, H), got {tuple(table.shape)} and {tuple(proj.shape)}")
        (num_embeddings, rank), embedding_dim = table.shape, proj.shape[1]
        layer = cls(num_embeddings, embedding_dim, rank, padding_idx, device=table.device, dtype=table.dtype)
        with torch.no_grad():
            layer.table.copy_(table)
            layer.proj.copy_(proj)
            if layer.padding_idx is not None:
                layer.table[layer.padding_idx].zero_()
        return layer

    def to_dense(self) -> torch.Tensor:
        """The (V, H) table this layer looks rows up in; for checks and dense export only."""
        return self.table @ self.proj

    def to_embedding(self) -> nn.Embedding:
        dense = self.to_dense().detach()
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                 device=dense.device, dtype=dense.dtype)
        with torch.no_grad():
            embedding.weight.copy_(dense)
        return embedding

    def layout_args(self) -> dict:
        """Constructor arguments, as JSON, so a checkpoint can rebuild this layer before loading."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "rank": self.rank,
            "padding_idx": self.padding_idx,
        }

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.table, self.padding_idx) @ self.proj

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}{pad}"


def padding_row_zero(embedding: nn.Embedding) -> int | None:
    """The embedding's padding_idx when its row is all zero (then kept exactly zero), else None: a padding
    row that holds values is approximated like any other row."""
    pad = embedding.padding_idx
    if pad is None or bool(embedding.weight.detach()[pad].any()):
        return None
    return pad


COMPRESSED = (LowRankEmbedding,)
