"""PrunedLinear: a plain nn.Linear holding the rows and/or columns of a larger layer that survived pruning.

Structured pruning (whole FFN neurons, attention heads) leaves dense layers, only smaller ones. The
class exists so that a checkpoint can record the reduced shape (`layout_args`) and rebuild the layer
before the weights load, when its size no longer matches the model config. Being an nn.Linear
subclass, every other pass and tool treats it as an ordinary Linear.

This file imports only torch: it is copied verbatim into checkpoints as remote code.
"""

from __future__ import annotations

import torch
from torch import nn


class PrunedLinear(nn.Linear):
    """nn.Linear whose shape differs from the one the model config implies."""

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        keep_out: torch.Tensor | None = None,
        keep_in: torch.Tensor | None = None,
    ) -> PrunedLinear:
        """Copy of `linear` restricted to output rows `keep_out` and input columns `keep_in` (None: all).

        Accepts nn.Linear (weight: out x in) and GPT-2's Conv1D (weight: in x out, y = x @ W + b),
        which becomes the equivalent Linear.
        """
        weight = linear.weight.detach()
        if type(linear).__name__ == "Conv1D":
            weight = weight.T
        bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
        if keep_out is not None:
            keep_out = torch.as_tensor(keep_out, device=weight.device).long()
            weight = weight[keep_out]
            bias = bias[keep_out] if bias is not None else None
        if keep_in is not None:
            weight = weight[:, torch.as_tensor(keep_in, device=weight.device).long()]
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies."""
        return self.weight.detach()

    def layout_args(self) -> dict:
        """Constructor arguments, as JSON, so a checkpoint can rebuild this layer before loading."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}


COMPRESSED = (PrunedLinear,)
