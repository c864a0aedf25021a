"""Int8DynamicLinear: 7-bit weights with one scale per output channel, run by fbgemm's int8 GEMM on CPU.

    W[i, j] ~ weight_int8[i, j] * weight_scale[i]      weight_int8: int8 (out, in)   weight_scale: fp32 (out,)

Weights: symmetric per-channel rounding, scale = max|W[i, :]| / 63, zero point 0, values -63..63 stored as
int8 (1 byte per weight + 4 bytes per output channel); every weight lies within scale/2 of its original.
Why 63 and not 127: fbgemm's AVX2 kernel adds pairs of uint8 x int8 products in int16, which saturates
(32767) for 8-bit activations against weights near +-127. With |w| <= 63, 2 * 255 * 63 = 32130 fits, so the
activations can use all 8 bits (reduce_range=False) at the cost of one bit of weight precision.

Activations, quantized at run time, per token: each row of x (over the last dim) is divided by its max|x|
(a row of zeros by the smallest normal float: it stays zeros); `quantized::linear_dynamic` (the kernel
behind torch.ao's dynamic Linear) quantizes that normalized tensor as it always does, per tensor, affine
uint8 0..255 from its min and max; the output rows are multiplied back by max|x| and the bias is added in
float. As every row now spans at most [-1, 1], that one per-tensor scale serves each token as its own would.

Why per token: fbgemm's own per-tensor scale is shared by all the tokens of a window, and a few outlier
tokens stretch it for everyone. Measured by fake-quantizing every Linear in the blocks of SmolLM2-135M
(perplexity on 2048 held-out tokens, window 512; fp32 41.66): int8 (+-127) weights alone 42.26; with
per-tensor 7-bit activations (fbgemm's default, reduce_range) 114.88; with per-token 7-bit ones 47.08;
+-63 weights with per-token 8-bit activations (this scheme) 42.89, 1.03x fp32.

Error levels (relative, each the rms of a uniform rounding error, step / sqrt(12), over the rms of what is
rounded): the 7-bit weights ~0.8% for uniformly distributed rows, ~1.2-1.4% for Gaussian ones (max|w| ~ 3
sigma); the activations ~0.7% for Gaussian tokens of 256 (step 2/255 of a token's max|x| ~ 3 sigma),
whatever the other tokens hold.

Layers holding values beyond +-63 (checkpoints written when the weights used +-127) would saturate those
int16 sums: they run with 7-bit activations (reduce_range), still per token.

fbgemm wants its weight pre-packed (without the bias: the output is rescaled before the bias is added).
The packed weight is a cache, a plain attribute (never saved), built on the first forward and rebuilt
whenever the weight or scale tensor is replaced or changed in place (checked by identity and autograd
version counter), e.g. by load_state_dict.

Speed, measured on this project's 2-core CPU (shared with other work, so noisy) for a 1536x576 layer: the
per-token scaling adds four small elementwise ops around the kernel (and the bias one, no longer fused).
At batch 1 that costs about as much as the int8 GEMM: ~1.0-1.2x the time of fp32 nn.Linear, against
~0.7-0.8x for the per-tensor scheme; at 512 tokens ~0.7x of fp32 (per tensor ~0.6x).
The int8 op has no backward, so with gradients on, the backward goes through the dequantized weight as if
rounding were the identity (same forward numbers). Without fbgemm (non-x86 builds) or off CPU, the forward
is a float matmul with the dequantized weight.

This file imports only torch: it is copied verbatim into checkpoints as remote code, so that plain
transformers can rebuild the model without llmshrink installed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

TINY = torch.finfo(torch.float32).tiny  # the per-token scale of a row of zeros
QMAX = 63  # -63..63, symmetric: +-max|w| of a row map to +-63 exactly; 63 keeps fbgemm's int16 sums exact


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
        self._packed = None  # (key of the tensors it came from, packed weight, reduce_range, those tensors)

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

    def buffered_weights(self) -> int:
        """Weights held in a buffer rather than parameters: size.count_params counts them."""
        return self.weight_int8.numel()

    def packed_weight(self):
        """fbgemm's packed weight (no bias), rebuilt if the tensors it came from changed since."""
        # Dict lookups, not attributes: nn.Module.__getattr__ costs ~1 us each, on every call.
        tensors = weight, scale = self._buffers["weight_int8"], self._buffers["weight_scale"]
        try:  # identity, and _version: it counts in-place changes (load_state_dict's copy_)
            key = (id(weight), weight._version, id(scale), scale._version)
        except RuntimeError:  # inference tensors have no version; load_state_dict still drops the cache
            key = (id(weight), id(scale))
        if self._packed is None or self._packed[0] != key:
            scale = scale.detach().float()
            # quantize_per_channel is the public way to make a qint8 tensor from the stored values:
            # int8 * scale / scale rounds back to the same int8 exactly (|q| <= 127 is far from a tie).
            zeros = torch.zeros_like(scale, dtype=torch.long)
            qweight = torch.quantize_per_channel(self.to_dense(), scale, zeros, 0, torch.qint8)
            engine = torch.backends.quantized.engine
            torch.backends.quantized.engine = "fbgemm"  # prepack packs for the current engine
            try:
                packed = torch.ops.quantized.linear_prepack(qweight, None)
            finally:
                torch.backends.quantized.engine = engine
            # Values beyond +-63 (a checkpoint written when QMAX was 127) would saturate the int16 sums
            # against 8-bit activations: such a layer gets 7-bit ones (reduce_range), as fbgemm's default.
            reduce_range = bool((weight.to(torch.int16).abs() > QMAX).any())
            # Holding the tensors keeps their ids from being reused.
            self._packed = (key, packed, reduce_range, tensors)
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
        reduce_range = self._packed[2]
        bias = self._parameters["bias"]
        # The bias is added in float after the rescaling (so autograd takes care of its gradient).
        if torch.is_grad_enabled() and x.requires_grad:
            # The int8 op has no autograd kernel (backprop through it is silently wrong): see below.
            out = _Int8LinearFunction.apply(x.float(), self.weight_int8, self.weight_scale, packed,
                                            reduce_range)
            out = out if bias is None else out + bias
        else:
            out = int8_matmul(x.float(), packed, reduce_range)  # the op takes fp32 only
            if bias is not None:
                out.add_(bias)  # in place on a fresh tensor: the same numbers as above, one allocation less
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def int8_matmul(x: torch.Tensor, packed, reduce_range: bool = False) -> torch.Tensor:
    """x (fp32) @ the packed weight, without bias, with 8-bit activations scaled per token.

    Each row is divided by its max|x| before fbgemm quantizes the whole tensor with one scale and zero point:
    after that every row spans at most [-1, 1], so no token's outlier coarsens the other tokens' steps."""
    if x.numel() == x.shape[-1]:
        # One token (decode): fbgemm's per-tensor scale already is this token's own. The normalisation would
        # cost ~35 us per layer here, about half of the int8 GEMM, for the same codes up to rounding ties.
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
    # One op for max|x| (the inf-norm); a row of zeros gets the smallest normal float instead of 0: it stays
    # zeros (its codes are the zero point) and 0 / 0 never happens. Cheaper than torch.where, which matters
    # at batch 1 where these few elementwise ops cost about as much as the int8 GEMM itself.
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min_(TINY)
    # reduce_range=False: all 8 bits, safe from int16 saturation while the weights stay within +-63.
    return torch.ops.quantized.linear_dynamic(x / amax, packed, reduce_range).mul_(amax)


class _Int8LinearFunction(torch.autograd.Function):
    """fbgemm forward (the same numbers as without grad); backward through the dequantized weight."""

    @staticmethod
    def forward(ctx, x, weight_int8, weight_scale, packed, reduce_range):
        ctx.save_for_backward(weight_int8, weight_scale)
        return int8_matmul(x, packed, reduce_range)

    @staticmethod
    def backward(ctx, grad):
        # Straight-through: rounding (and the per-token scaling around it) taken as the identity,
        # so the gradient is that of x @ dense.T.
        weight_int8, weight_scale = ctx.saved_tensors
        dense = weight_int8.float() * weight_scale.float().unsqueeze(1)
        grad_x = grad @ dense if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of nn.Linear or GPT-2 Conv1D (which stores in x out)."""
    if type(layer).__name__ == "Conv1D":
        return layer.weight.detach().T
    return layer.weight.detach()


COMPRESSED = (Int8DynamicLinear,)
