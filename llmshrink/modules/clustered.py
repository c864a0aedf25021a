"""ClusteredLinear: a linear layer whose weights share k values (k-means weight sharing, Han et al.).

    W[i, j] = codebook[index[i, j]]        codebook: k floats (trainable)   index: log2(k)-bit integers

The indices are packed into a uint8 buffer: 8 // b per byte for b = 1, 2, 4 or 8 bits (the smallest
that holds k codes), so a 16-cluster layer stores half a byte per weight on disk and in memory. The
forward gathers the codebook into the dense weight and does one matmul; nothing is cached (memory
stays compact, at the price of one gather per call), and the codebook stays trainable: its gradient is the sum of the weight gradients over each
cluster, which is how Deep Compression fine-tunes centroids while the assignments stay fixed.

This file imports only torch: it is copied verbatim into checkpoints as remote code, so that plain
transformers can rebuild the model without llmshrink installed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MAX_CLUSTERS = 256  # one uint8 per index at most


def index_bits(clusters: int) -> int:
    """Storage bits per index: the smallest of 1, 2, 4, 8 that holds `clusters` codes (so bytes split evenly)."""
    if not 2 <= clusters <= MAX_CLUSTERS:
        raise ValueError(f"clusters must be in 2..{MAX_CLUSTERS}, got {clusters}")
    return next(bits for bits in (1, 2, 4, 8) if clusters <= 2**bits)


def packed_size(count: int, bits: int) -> int:
    """Bytes that hold `count` indices of `bits` bits each."""
    per_byte = 8 // bits
    return -(-count // per_byte)


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten integer indices (each < 2**bits) into uint8 bytes, 8 // bits per byte, lowest bits first."""
    per_byte = 8 // bits
    flat = indices.reshape(-1).to(torch.uint8)
    padded = torch.zeros(packed_size(flat.numel(), bits) * per_byte, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
    return (padded.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_indices: the first `count` indices as int64 (what indexing wants)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:count].long()


class ClusteredLinear(nn.Module):
    """Drop-in replacement for nn.Linear (and GPT-2 Conv1D): weights drawn from a k-entry codebook."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        clusters: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.clusters = in_features, out_features, clusters
        self.bits = index_bits(clusters)
        kw = {"device": device, "dtype": dtype}
        self.codebook = nn.Parameter(torch.zeros(clusters, **kw))
        count = out_features * in_features
        # Persistent: the packed indices are the layer's weights and must be saved bit-exactly.
        self.register_buffer(
            "indices", torch.zeros(packed_size(count, self.bits), dtype=torch.uint8, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_clusters(
        cls, linear: nn.Module, codebook: torch.Tensor, assignments: torch.Tensor
    ) -> ClusteredLinear:
        """Build from a dense layer (for shape, bias, device, dtype), k centroids and each weight's cluster.

        `assignments` holds one cluster number per weight, shaped like the (out, in) weight; for GPT-2's
        Conv1D (weight stored in x out) that is the transpose of its stored weight.
        """
        weight = dense_weight(linear)
        out_features, in_features = weight.shape
        assignments = torch.as_tensor(assignments)
        if tuple(assignments.shape) != (out_features, in_features):
            raise ValueError(f"assignments are {tuple(assignments.shape)}, layer is {out_features}x{in_features}")
        clusters = codebook.numel()
        if assignments.numel() and (int(assignments.min()) < 0 or int(assignments.max()) >= clusters):
            raise ValueError(f"assignments must lie in 0..{clusters - 1}")
        bias = getattr(linear, "bias", None)
        layer = cls(in_features, out_features, clusters, bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
        with torch.no_grad():
            layer.codebook.copy_(codebook.reshape(-1))
            layer.indices.copy_(pack_indices(assignments.to(weight.device), layer.bits))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def assignments(self) -> torch.Tensor:
        """Each weight's cluster number, (out, in) int64."""
        count = self.out_features * self.in_features
        return unpack_indices(self.indices, self.bits, count).view(self.out_features, self.in_features)

    def gathered_weight(self) -> torch.Tensor:
        """The (out, in) weight, gathered from the codebook (differentiable in the codebook).

        Looks each packed byte up in a 256-row table of the weights it stands for, rather than
        unpacking every index first: one gather over the bytes (measured ~6x faster on CPU).
        """
        shifts = torch.arange(0, 8, self.bits, device=self.indices.device)
        byte_codes = (torch.arange(256, device=self.indices.device).unsqueeze(1) >> shifts) & (2**self.bits - 1)
        table = self.codebook[byte_codes.clamp(max=self.clusters - 1)]  # (256, 8 // bits); codes >= k never occur
        count = self.out_features * self.in_features
        weights = table.index_select(0, self.indices.long()).reshape(-1)[:count]
        return weights.view(self.out_features, self.in_features)

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies; for checks and dense export only."""
        return self.gathered_weight().detach()

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.codebook.device, dtype=self.codebook.dtype)
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
            "clusters": self.clusters,
            "bias": self.bias is not None,
        }

    def buffered_weights(self) -> int:
        """Weights held as packed indices rather than parameters: size.count_params counts them (and
        the codebook's k values, which are parameters, on top)."""
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.gathered_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"clusters={self.clusters}, index_bits={self.bits}, bias={self.bias is not None}"
        )


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of nn.Linear or GPT-2 Conv1D (which stores in x out)."""
    if type(layer).__name__ == "Conv1D":
        return layer.weight.detach().T
    return layer.weight.detach()


COMPRESSED = (ClusteredLinear,)
