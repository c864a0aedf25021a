"""FakeQuantLinear: an nn.Linear computing with its weight rounded to 7 bits, for quantization-aware training.

The weight stays a float parameter that the optimizer updates; every forward rounds it per output channel
exactly as Int8DynamicLinear.from_linear will (symmetric, scale = max|W[i, :]| / 63, values -63..63: the
int8 kernel's int16 pair sums stay exact against 8-bit activations), so the model trains against the error
it will have once converted. Rounding has no useful gradient, so the backward treats it as the identity
(straight-through estimator).

Optionally (`activations`) the input is rounded as Int8DynamicLinear rounds it: each token (row over the last
dim) divided by its max|x|, the whole normalized tensor rounded to uint8 0..255 with one affine scale and
zero point from its min and max, computed as fbgemm computes them, then multiplied back by max|x|. The
forward then matches the converted layer's to float rounding (the products are summed in another order).

This file imports only torch: it is copied verbatim into checkpoints as remote code, so that plain
transformers can rebuild the model without llmshrink installed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

TINY = torch.finfo(torch.float32).tiny  # the per-token scale of a row of zeros
QMAX = 63  # symmetric weights: -63..63, as Int8DynamicLinear stores them
ACT_QMAX = 255  # uint8 activations: 0..255


def round_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric 7-bit rounding, returned dequantized; straight-through gradient.

    Computed as Int8DynamicLinear.from_linear computes it (float64 division by the float32 scale it stores),
    so that converting a trained layer gives exactly the weights it trained with."""
    w = weight.detach().double()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, 1.0).float()
    values = torch.round(w / scale.double()).clamp(-QMAX, QMAX)
    rounded = (values.float() * scale).to(weight.dtype)
    return weight + (rounded - weight).detach()


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token 8-bit rounding of the input, as Int8DynamicLinear does it; straight-through gradient."""
    v = x.detach().float()
    if v.numel() == 0:
        return x
    # As Int8DynamicLinear: max|x| per row, the smallest normal float for a row of zeros (it stays zeros);
    # a single row (one token) is quantized as it is, its own range being the tensor's.
    if v.numel() == v.shape[-1]:
        amax = torch.ones((), dtype=v.dtype, device=v.device)
    else:
        amax = torch.linalg.vector_norm(v, float("inf"), dim=-1, keepdim=True).clamp_min(TINY)
    normed = v / amax
    # fbgemm (ChooseQuantizationParams): the range widened to hold 0, the scale computed in float64 and
    # used as fp32 for the rounding, but the zero point computed with the float64 one: with the usual
    # range [-1, 1] it is round(127.5) = 128, where the fp32 scale would give 127.
    low = normed.min().double().clamp(max=0)
    high = normed.max().double().clamp(min=0)
    scale64 = (high - low) / ACT_QMAX
    scale64 = torch.where(scale64 > 0, scale64, 0.1)  # all zeros: fbgemm's fallback (any scale would do)
    zero = torch.round(-low / scale64).clamp(0, ACT_QMAX)
    scale = scale64.float()
    # fbgemm multiplies by the fp32 reciprocal and adds the zero point in one fused multiply-add, rounded
    # once to fp32: float64 products of fp32 numbers are exact, so float64 then fp32 rounds the same.
    codes = torch.round((normed.double() * (1 / scale).double() + zero).float()).clamp(0, ACT_QMAX)
    rounded = (codes - zero.float()) * scale * amax
    return x + (rounded.to(x.dtype) - x).detach()


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses the 7-bit-rounded weight (and, optionally, per-token 8-bit inputs)."""

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
        """The weight the forward uses: on the grid Int8DynamicLinear stores."""
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
