"""SparseLinear: a linear layer that stores only the weights that survived unstructured pruning.

    values: the nnz kept weights, row-major (trainable)     mask: one bit per weight, packed into uint8

The bitmask costs 1/8 byte per weight whatever the sparsity, so an fp32 layer at 50% sparsity takes
2 + 0.125 bytes per weight instead of 4 (and is smaller than dense at any sparsity above 1/32).
Column indices (uint16 per kept weight) would only win above ~94% sparsity.

The forward scatters the values into a dense weight and does one matmul. Nothing is cached, so memory
stays compact; the values stay trainable (their gradient is the dense gradient at the kept positions),
and pruned weights cannot come back, because they are not stored at all. Measured on one CPU thread,
1536x576 at 50% sparsity: the scatter costs ~6 ms per call, so 512 tokens take ~20-27 ms (dense 18-20,
torch.sparse CSR 57-72) but one decoded token ~6 ms (dense 0.1, CSR 0.8-1.6). CSR would also hold int64
indices, more memory than the dense weight. For fast decoding, export dense (`to_linear`).

This file imports only torch: it is copied verbatim into checkpoints as remote code, so that plain
transformers can rebuild the model without llmshrink installed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_SHIFTS = (1, 2, 4, 8, 16, 32, 64, 128)  # bit j of a byte stands for weight 8·i + j (lowest bit first)


def packed_size(count: int) -> int:
    """Bytes of a bitmask over `count` weights."""
    return -(-count // 8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Flatten a boolean mask (row-major) into uint8 bytes, 8 weights per byte, lowest bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    padded = torch.zeros(packed_size(flat.numel()) * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    weights = torch.tensor(_SHIFTS, dtype=torch.uint8, device=flat.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of pack_mask: the first `count` bits as a flat bool tensor.

    Looks each byte up in a 256-entry table of its 8 bits, held as one int64 per byte (8 bytes of 0/1)
    so the lookup is a single gather: ~8x faster on CPU than shifting and masking every bit.
    """
    bits = (torch.arange(256, device=packed.device).unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1
    table = bits.to(torch.uint8).contiguous().view(torch.int64).view(256)  # same memory, read 8 bytes at once
    return table[packed.long()].view(torch.uint8).view(torch.bool)[:count]


class SparseLinear(nn.Module):
    """Drop-in replacement for nn.Linear (and GPT-2 Conv1D) that keeps `nnz` of its weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nnz: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"nnz must lie in 0..{in_features * out_features}, got {nnz}")
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        kw = {"device": device, "dtype": dtype}
        self.values = nn.Parameter(torch.zeros(nnz, **kw))
        # Persistent: the mask says where the values go and must be saved bit-exactly.
        self.register_buffer(
            "mask", torch.zeros(packed_size(in_features * out_features), dtype=torch.uint8, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, keep: torch.Tensor) -> SparseLinear:
        """Keep the weights of `linear` where `keep` (bool, shaped like the (out, in) weight) is True.

        Accepts nn.Linear (weight: out x in), transformers' Conv1D (weight: in x out; `keep` is then
        the transpose of its stored weight's shape) and SparseLinear (to prune further: `keep` must
        lie inside its mask, since pruned weights are gone).
        """
        weight = linear.to_dense() if isinstance(linear, SparseLinear) else dense_weight(linear)
        out_features, in_features = weight.shape
        keep = torch.as_tensor(keep, device=weight.device).bool()
        if tuple(keep.shape) != (out_features, in_features):
            raise ValueError(f"keep mask is {tuple(keep.shape)}, layer is {out_features}x{in_features}")
        if isinstance(linear, SparseLinear) and bool((keep & ~linear.kept()).any()):
            raise ValueError("keep mask revives weights this SparseLinear has already pruned")
        bias = getattr(linear, "bias", None)
        layer = cls(in_features, out_features, int(keep.sum()), bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.values.copy_(weight[keep])
            layer.mask.copy_(pack_mask(keep))
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def kept(self) -> torch.Tensor:
        """Which weights are stored: (out, in) bool."""
        return unpack_mask(self.mask, self.out_features * self.in_features).view(self.out_features, self.in_features)

    def scattered_weight(self) -> torch.Tensor:
        """The (out, in) weight, zeros at pruned positions (differentiable in the values)."""
        count = self.out_features * self.in_features
        dense = self.values.new_zeros(count).masked_scatter(unpack_mask(self.mask, count), self.values)
        return dense.view(self.out_features, self.in_features)

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies; for checks and dense export only."""
        return self.scattered_weight().detach()

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def layout_args(self) -> dict:
        """Constructor arguments, as JSON, so a checkpoint can rebuild this layer (and size `values`)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "nnz": self.nnz,
            "bias": self.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.scattered_weight(), self.bias)

    def extra_repr(self) -> str:
        sparsity = 1 - self.nnz / max(1, self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"sparsity={sparsity:.4f}, bias={self.bias is not None}"
        )


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of nn.Linear or GPT-2 Conv1D (which stores in x out)."""
    if type(layer).__name__ == "Conv1D":
        return layer.weight.detach().T
    return layer.weight.detach()


COMPRESSED = (SparseLinear,)
