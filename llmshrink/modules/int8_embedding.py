"""Int8Embedding: an embedding table stored as int8 with one fp32 scale per row.

    E[i, j] ~ weight_int8[i, j] * weight_scale[i]      weight_int8: int8 (rows, dim)   weight_scale: fp32 (rows,)

Rows: symmetric rounding to nearest, scale = max|E[i, :]| / 127, zero point 0, values -127..127 (an all-zero
row, such as the padding row, gets scale 1 and stays zeros); every value lies within scale/2 of its original.
Storage: rows x dim bytes + 4 bytes per row, about a quarter of fp32 (dim 384: 0.26x).

Unlike Int8DynamicLinear's weights (+-63, for fbgemm's int16 sums), nothing multiplies these codes in int8:
the forward gathers the rows of the given ids (int8) and their scales, and multiplies them in fp32, so the
full table is never dequantized. The output is exactly what nn.Embedding with the weight to_dense() gives
(the same fp32 product), cast to the dtype the module was moved to (fp32 unless model.to(...) said
otherwise; the scales themselves stay fp32).

No parameters: the int8 values and scales are buffers (not trainable; a gradient stops here). `weight`
is the dequantized table, built on each access, for code that reads `get_input_embeddings().weight`
(dtype, device, tied-weight checks); the forward never uses it.

This file imports only torch: it is copied verbatim into checkpoints as remote code, so that plain
transformers can rebuild the model without llmshrink installed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

QMAX = 127  # -127..127, symmetric: +-max|E[i, :]| of a row map to +-127 exactly


class Int8Embedding(nn.Module):
    """Drop-in replacement for nn.Embedding (lookup only): int8 rows, one fp32 scale per row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, device=None,
                 dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings  # as nn.Embedding stores it
        if padding_idx is not None and not 0 <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx {padding_idx} is not a row of {num_embeddings}")
        self.padding_idx = padding_idx
        shape = (num_embeddings, embedding_dim)
        self.register_buffer("weight_int8", torch.zeros(shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))
        self.out_dtype = dtype or torch.float32  # what forward returns; set by model.to(dtype) & co.

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """Round each row of an nn.Embedding's float table to int8 with its own scale."""
        if embedding.max_norm is not None:
            raise ValueError("an embedding with max_norm renormalises its rows on lookup; it cannot be int8")
        weight = embedding.weight.detach()
        table = weight.double()  # float64: round against the exact fp32 scale stored below
        amax = table.abs().amax(dim=1)
        # An all-zero row (the padding row) gets scale 1 (its values are 0 anyway): no division by zero.
        scale = torch.where(amax > 0, amax / QMAX, 1.0).float()
        values = torch.round(table / scale.double().unsqueeze(1)).clamp(-QMAX, QMAX)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight_int8.copy_(values.to(torch.int8))
            layer.weight_scale.copy_(scale)
        return layer

    def to_dense(self) -> torch.Tensor:
        """The (rows, dim) fp32 table, int8 * scale; for checks and dense export (the forward does not use it)."""
        return self.weight_int8.float() * self.weight_scale.float().unsqueeze(1)

    def to_embedding(self) -> nn.Embedding:
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                                 device=self.weight_int8.device, dtype=self.out_dtype)
        with torch.no_grad():
            embedding.weight.copy_(self.to_dense())
        return embedding

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (a new tensor each time, in the output dtype): for code that reads .weight."""
        return self.to_dense().to(self.out_dtype)

    def layout_args(self) -> dict:
        """Constructor arguments, as JSON, so a checkpoint can rebuild this layer before loading."""
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    def buffered_weights(self) -> int:
        """Weights held in a buffer rather than parameters: size.count_params counts them."""
        return self.weight_int8.numel()

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) & co. set the output dtype; the scales stay exactly the fp32 values they were.
        scale = self._buffers["weight_scale"]
        super()._apply(fn, recurse)
        moved = self._buffers["weight_scale"]
        if moved.is_floating_point():
            self.out_dtype = moved.dtype
        self._buffers["weight_scale"] = scale.to(device=moved.device, dtype=torch.float32)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Gather first: only the looked-up rows (and their scales) are dequantized.
        rows = F.embedding(ids, self._buffers["weight_int8"])
        scales = F.embedding(ids, self._buffers["weight_scale"].unsqueeze(1))
        out = rows.float() * scales.float()
        return out if out.dtype == self.out_dtype else out.to(self.out_dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))


COMPRESSED = (Int8Embedding,)
