"""Int8DynamicLinear: int8 weights with one scale per output channel, run by fbgemm's int8 GEMM on CPU.

    W[i, j] ~ weight_int8[i, j] * weight_scale[i]      weight_int8: int8 (out, in)   weight_scale: fp32 (out,)

Symmetric per-channel rounding (scale = max|W[i, :]| / 127, zero point 0) keeps every weight within
scale/2 of its original value and stores 1 byte per weight (+ 4 bytes per output channel).

The forward quantizes the activations at run time (uint8, one scale and zero point for the whole input,
from its min and max) and runs `quantized::linear_dynamic`, the kernel behind torch.ao's dynamic Linear.
Like torch.ao it passes reduce_range=True (7-bit activations): fbgemm's AVX2 kernel adds pairs of
uint8 x int8 products in int16, which saturates for 8-bit activations against weights near +-127
(measured here: 4.7% output error without it, 1.7% with). That per-tensor 7-bit step dominates the
error: ~1-2% relative on Gaussian inputs, against ~0.4% from the int8 weights.

fbgemm wants its weight pre-packed. The packed weight is a cache, a plain attribute (never saved), built
on the first forward and rebuilt whenever the weight, scale or bias tensor is replaced or changed in place
(checked by identity and autograd version counter), e.g. by load_state_dict.

Measured at batch 1 on this project's 2-core CPU (shared with other work, so noisy): a 1536x576 layer
runs in ~0.8x the time of fp32 nn.Linear, within ~10% of torch.ao's dynamic Linear (the same kernel).
The int8 op has no backward, so with gradients on, the backward goes through the dequantized weight
(same forward numbers). Without fbgemm (non-x86 builds) or off CPU, the forward is a float matmul with
the dequantized weight.

This file imports only torch: it is copied verbatim into checkpoints as remote code, so that plain
transformers can rebuild the model without llmshrink installed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

QMAX = 127  # -127..127, symmetric: +-max|w| of a row map to +-127 exactly, and -128 is never used


# Whether this torch build has the int8 kernel: fbgemm is listed only in x86 builds on CPUs with AVX2.
# torch 2.13 deprecates quantized tensors (quantize_per_channel): once they are gone, fall back.
FBGEMM = ("fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch, "quantize_per_channel")
          and hasattr(torch.ops.quantized, "linear_dynamic"))


class Int8DynamicLinear(nn.Module):
    """Drop-in replacement for nn.Linear (and GPT-2 Conv1D): int8 per-channel weights, for CPU inference."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Persistent buffers, not parameters: the int8 values are not trainable, and plain int8 and
        # fp32 tensors are what safetensors can save.
        shape = (out_features, in_features)
        self.register_buffer("weight_int8", torch.zeros(shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
                                if bias else None)
        self._packed = None  # (key of the tensors it was built from, packed weight, those tensors)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> Int8DynamicLinear:
        """Round the weight of nn.Linear (out x in) or transformers' Conv1D (in x out) per output channel."""
        weight = dense_weight(linear).double()  # float64: round against the exact fp32 scale stored below
        out_features, in_features = weight.shape
        amax = weight.abs().amax(dim=1)
        # An all-zero row gets scale 1 (its int8 values are 0 anyway): a zero scale would divide by zero.
        scale = torch.where(amax > 0, amax / QMAX, 1.0).float()
        values = torch.round(weight / scale.double().unsqueeze(1)).clamp(-QMAX, QMAX)
        bias = getattr(linear, "bias", None)
        layer = cls(in_features, out_features, bias=bias is not None, device=weight.device,
                    dtype=bias.dtype if bias is not None else None)
        with torch.no_grad():
            layer.weight_int8.copy_(values.to(torch.int8))
            layer.weight_scale.copy_(scale)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def to_dense(self) -> torch.Tensor:
        """The (out, in) fp32 weight, int8 * scale; for checks, the fallback and dense export."""
        return self.weight_int8.float() * self.weight_scale.float().unsqueeze(1)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight_int8.device)
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def layout_args(self) -> dict:
        """Constructor arguments, as JSON, so a checkpoint can rebuild this layer before loading."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def packed_weight(self):
        """fbgemm's packed weight (and bias), rebuilt if any tensor it came from changed since."""
        # Dict lookups, not attributes: nn.Module.__getattr__ costs ~1 us each, on every call.
        tensors = weight, scale, bias = (self._buffers["weight_int8"], self._buffers["weight_scale"],
                                         self._parameters["bias"])
        try:  # identity, and _version: it counts in-place changes (load_state_dict's copy_, optimizer steps)
            key = (id(weight), weight._version, id(scale), scale._version,
                   id(bias), None if bias is None else bias._version)
        except RuntimeError:  # inference tensors have no version; load_state_dict still drops the cache
            key = (id(weight), id(scale), id(bias))
        if self._packed is None or self._packed[0] != key:
            scale = scale.detach().float()
            # quantize_per_channel is the public way to make a qint8 tensor from the stored values:
            # int8 * scale / scale rounds back to the same int8 exactly (|q| <= 127 is far from a tie).
            zeros = torch.zeros_like(scale, dtype=torch.long)
            qweight = torch.quantize_per_channel(self.to_dense(), scale, zeros, 0, torch.qint8)
            bias = None if bias is None else bias.detach().float()
            engine = torch.backends.quantized.engine
            torch.backends.quantized.engine = "fbgemm"  # prepack packs for the current engine
            try:
                packed = torch.ops.quantized.linear_prepack(qweight, bias)
            finally:
                torch.backends.quantized.engine = engine
            self._packed = (key, packed, tensors)  # holding the tensors keeps their ids from being reused
        return self._packed[1]

    def _apply(self, fn, recurse=True):
        # Keep the scales fp32 through model.to(bfloat16) & co: a bf16 scale would add up to 0.4% error,
        # and a bf16 model would no longer load its own fp32 scales back.
        super()._apply(fn, recurse)
        self._buffers["weight_scale"] = self._buffers["weight_scale"].float()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # also covers inference tensors, which the version check cannot see
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (FBGEMM and x.is_cpu):
            # No fbgemm in this torch build (or not on CPU): the dequantized weight and a float matmul.
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.to_dense().to(x.dtype), bias)
        if x.dim() == 1:  # the op wants 2-D or more
            return self.forward(x.unsqueeze(0)).squeeze(0)
        packed = self.packed_weight()
        bias = self.bias
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            # The int8 op has no autograd kernel (backprop through it is silently wrong): see below.
            out = _Int8LinearFunction.apply(x.float(), self.weight_int8, self.weight_scale, bias, packed)
        else:
            out = torch.ops.quantized.linear_dynamic(x.float(), packed, True)  # it takes fp32 only
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class _Int8LinearFunction(torch.autograd.Function):
    """fbgemm forward (the same numbers as without grad); backward through the dequantized weight."""

    @staticmethod
    def forward(ctx, x, weight_int8, weight_scale, bias, packed):
        ctx.save_for_backward(weight_int8, weight_scale)
        return torch.ops.quantized.linear_dynamic(x, packed, True)

    @staticmethod
    def backward(ctx, grad):
        weight_int8, weight_scale = ctx.saved_tensors
        dense = weight_int8.float() * weight_scale.float().unsqueeze(1)
        grad_x = grad @ dense if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of nn.Linear or GPT-2 Conv1D (which stores in x out)."""
    if type(layer).__name__ == "Conv1D":
        return layer.weight.detach().T
    return layer.weight.detach()


COMPRESSED = (Int8DynamicLinear,)
