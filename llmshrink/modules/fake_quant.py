"""FakeQuantLinear: an nn.Linear that computes with its weight rounded to int8, for quantization-aware training.

The weight stays a float parameter that the optimizer updates; every forward rounds it per output channel
exactly as Int8DynamicLinear.from_linear will (symmetric, scale = max|W[i, :]| / 127), so the model trains
against the error it will have once converted. Rounding has no useful gradient, so the backward treats it
as the identity (straight-through estimator). Optionally the input is rounded as fbgemm's dynamic int8
kernel rounds activations (per tensor, affine, 7 bits: reduce_range).

This file imports only torch: it is copied verbatim into checkpoints as remote code, so that plain
transformers can rebuild the model without llmshrink installed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

QMAX = 127  # symmetric int8 weights: -127..127
ACT_QMAX = 127  # uint8 activations with reduce_range: 0..127


def round_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 rounding, returned dequantized; straight-through gradient.

    Computed as Int8DynamicLinear.from_linear computes it (float64 division by the float32 scale it stores),
    so that converting a trained layer gives exactly the weights it trained with."""
    w = weight.detach().double()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, 1.0).float()
    values = torch.round(w / scale.double()).clamp(-QMAX, QMAX)
    rounded = (values.float() * scale).to(weight.dtype)
    return weight + (rounded - weight).detach()


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor affine 7-bit rounding of the input (fbgemm's dynamic scheme); straight-through gradient."""
    low = x.detach().min().clamp(max=0)
    high = x.detach().max().clamp(min=0)
    scale = ((high - low) / ACT_QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-low / scale).clamp(0, ACT_QMAX)
    rounded = (torch.round(x / scale + zero).clamp(0, ACT_QMAX) - zero) * scale
    return x + (rounded - x).detach()


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses the int8-rounded weight (and, optionally, 7-bit-rounded inputs)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activations = activations

    @classmethod
    def from_linear(cls, linear: nn.Module, activations: bool = False) -> FakeQuantLinear:
        """From nn.Linear (out x in) or transformers' Conv1D (in x out), same weights."""
        weight = dense_weight(linear)
        out_features, in_features = weight.shape
        bias = getattr(linear, "bias", None)
        layer = cls(in_features, out_features, bias=bias is not None, activations=activations,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def to_dense(self) -> torch.Tensor:
        """The weight the forward uses: on the int8 grid."""
        return round_weight(self.weight).detach()

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def layout_args(self) -> dict:
        """Constructor arguments, as JSON, so a checkpoint can rebuild this layer before loading."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "activations": self.activations}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations:
            x = round_activations(x)
        return F.linear(x, round_weight(self.weight), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activations={self.activations}"


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of nn.Linear or GPT-2 Conv1D (which stores in x out)."""
    if type(layer).__name__ == "Conv1D":
        return layer.weight.detach().T
    return layer.weight.detach()


COMPRESSED = (FakeQuantLinear,)
