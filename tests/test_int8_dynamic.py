"""Int8DynamicLinear: per-channel rounding, fbgemm output vs a hand reference, models, storage, reload."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import relative, reload_without_llmshrink, tiny_gpt2, tiny_llama, tiny_tokenizer
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from llmshrink.checkpoint import save_checkpoint
from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.modules import int8_dynamic
from llmshrink.modules.int8_dynamic import Int8DynamicLinear
from llmshrink.targeting import replace_module

pytestmark = [
    pytest.mark.skipif(not int8_dynamic.FBGEMM, reason="needs fbgemm (x86 CPU torch)"),
    # torch 2.13 deprecates quantize_per_channel (used to hand the int8 weight to fbgemm's prepack).
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
]

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def quantize_mlps(model: nn.Module) -> list[str]:
    """Replace every Linear / Conv1D under an `.mlp.` (not the lm_head) by Int8DynamicLinear."""
    names = [name for name, module in model.named_modules()
             if ".mlp." in name and type(module).__name__ in ("Linear", "Conv1D")]
    for name in names:
        replace_module(model, name, Int8DynamicLinear.from_linear(model.get_submodule(name)))
    return names


def row_max(x: torch.Tensor) -> torch.Tensor:
    """max|x| of each token (row over the last dim): the layer's per-token scale. A row of zeros gets 1 here
    and the smallest normal float in the layer: either way it stays zeros."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax, 1.0)


def by_hand(x: torch.Tensor, layer: Int8DynamicLinear, levels: int = 255) -> torch.Tensor:
    """What the layer computes, in float64 where fbgemm does not round in fp32.

    Each row divided by its max|x| (in fp32, as the layer hands it to fbgemm); that tensor quantized per
    tensor to 0..levels with fbgemm's parameters (range widened to hold 0; scale computed in float64 and
    used as fp32; zero point from the float64 scale, half to even; codes = round(fp32(x * fp32(1 / scale)
    + zero point)), one fused multiply-add); integer products with the int8 weight (exact, as fbgemm's int32
    sums are when nothing saturates); scaled back, times max|x|, plus bias. A single row (one token) is
    quantized as it is: amax 1."""
    amax = row_max(x) if x.numel() != x.shape[-1] else torch.ones(())
    normed = x.float() / amax
    low, high = min(float(normed.min()), 0.0), max(float(normed.max()), 0.0)
    scale64 = (high - low) / levels
    zero_point = min(max(round(-low / scale64), 0), levels)  # Python's round is half to even, like nearbyint
    scale = torch.tensor(scale64, dtype=torch.float32)
    inverse = float(1 / scale)  # fp32 reciprocal
    codes = torch.round((normed.double() * inverse + zero_point).float()).clamp(0, levels).double()
    acc = (codes - zero_point) @ layer.weight_int8.double().T
    out = acc * float(scale) * layer.weight_scale.double() * amax.double()
    return out if layer.bias is None else out + layer.bias.double()


def activation_step(x: torch.Tensor) -> torch.Tensor:
    """Each row's rounding step: the normalized tensor's step (its range / 255) times the row's max|x|."""
    normed = x.float() / row_max(x)
    return (max(float(normed.max()), 0.0) - min(float(normed.min()), 0.0)) / 255 * row_max(x)


# --- the layer ----------------------------------------------------------------------------------


@torch.no_grad()
def test_per_channel_rounding_is_within_half_a_scale():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    linear.weight.mul_(torch.logspace(-3, 1, 40).unsqueeze(1))  # rows four decades apart
    linear.weight[7] = 0.0
    layer = Int8DynamicLinear.from_linear(linear)
    w, q, scale = linear.weight.double(), layer.weight_int8, layer.weight_scale
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and layer.bias.dtype == torch.float32
    expected = (linear.weight.abs().amax(dim=1).double() / 63).float()
    expected[7] = 1.0  # an all-zero row: scale 1, values 0
    assert torch.equal(scale, expected)
    assert not q[7].any() and q.abs().max() <= 63
    assert all(q[i].abs().max() == 63 for i in range(40) if i != 7)  # the largest weight of a row is +-63
    # In float64 q * s and s / 2 are exact: every weight lies within half a step of its int8 value.
    error = (q.double() * scale.double().unsqueeze(1) - w).abs()
    assert bool((error <= scale.double().unsqueeze(1) / 2).all())
    assert float((error / scale.double().unsqueeze(1)).max()) > 0.49  # and the bound is tight
    assert torch.equal(layer.to_dense(), q.float() * scale.unsqueeze(1))
    assert layer.layout_args() == {"in_features": 96, "out_features": 40, "bias": True}
    dense = layer.to_linear()
    assert torch.equal(dense.weight, layer.to_dense()) and torch.equal(dense.bias, linear.bias)


@torch.no_grad()
def test_output_matches_fbgemm_by_hand_and_fp32_within_the_quantization_error():
    torch.manual_seed(0)
    linear = nn.Linear(256, 512)
    layer = Int8DynamicLinear.from_linear(linear)
    for seed in range(3):
        x = torch.randn(4, 8, 256, generator=torch.Generator().manual_seed(seed))
        y = layer(x)
        assert y.shape == (4, 8, 512) and y.dtype == torch.float32
        assert torch.allclose(y.double(), by_hand(x, layer), rtol=0, atol=1e-5)  # |y| ~ 3; observed ~4e-7
        # Activation rounding moves each input by at most its row's step / 2, so each output by at most
        # step / 2 * sum|W_i|.
        weight_only = F.linear(x, layer.to_dense(), linear.bias)
        step = activation_step(x)
        bound = step / 2 * layer.to_dense().abs().sum(dim=1)
        assert bool(((y - weight_only).abs() <= bound + 1e-5).all())
        # Relative errors vs the fp32 layer, each the rms of a uniform rounding error, step / sqrt(12),
        # over the rms of what is rounded: 7-bit weights ~0.8% (max|W_i| / 63 against uniform weights),
        # 8-bit per-token activations ~0.7% (2 max|x_i| / 255, max|x_i| ~ 3 for 256 Gaussians).
        # Together ~1.05%.
        full = linear(x)
        weight_error = float((weight_only - full).norm() / full.norm())
        w = linear.weight.double()
        predicted_weight = float((layer.weight_scale.double() ** 2 / 12).mean().sqrt()
                                 / w.pow(2).mean().sqrt())
        activation_error = float((y - weight_only).norm() / weight_only.norm())
        predicted = float(step.pow(2).mean().sqrt()) / math.sqrt(12) / float(x.pow(2).mean().sqrt())
        assert 0.85 * predicted_weight < weight_error < 1.15 * predicted_weight
        assert 0.85 * predicted < activation_error < 1.15 * predicted
        assert float((y - full).norm() / full.norm()) < 1.3e-2


@torch.no_grad()
def test_an_outlier_token_does_not_coarsen_the_other_tokens():
    """Why per token: one token 100x larger than the rest (as the residual stream has) leaves the other
    tokens' outputs exactly as they were, where one scale for the whole tensor makes their steps 100x
    coarser."""
    torch.manual_seed(7)
    linear = nn.Linear(256, 128)
    layer = Int8DynamicLinear.from_linear(linear)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(7))
    outlier = x.clone()
    outlier[0] *= 100
    y, y_outlier = layer(x), layer(outlier)
    # The other rows divide to the same normalized values, and the tensor's range stays [-1, 1].
    assert torch.equal(y_outlier[1:], y[1:])
    # |y| up to ~300; observed 2e-5
    assert torch.allclose(y_outlier.double(), by_hand(outlier, layer), rtol=0, atol=1e-4)

    def activation_error(out, x):  # per row, relative to the same layer without activation rounding
        weight_only = F.linear(x, layer.to_dense(), linear.bias)
        return (out - weight_only).norm(dim=-1) / weight_only.norm(dim=-1)

    per_token = activation_error(y_outlier, outlier)
    assert float(per_token.max()) < 1.2e-2  # observed 0.5-0.8% on every row, the outlier's included
    # fbgemm's own scheme by hand: one affine 8-bit scale for the whole tensor (reduce_range=False here,
    # which only helps it), from the outlier's range.
    low, high = float(outlier.min()), float(outlier.max())
    scale = (high - low) / 255
    zero_point = round(-low / scale)
    codes = torch.clamp(torch.round(outlier.double() / scale) + zero_point, 0, 255)
    per_tensor = F.linear(((codes - zero_point) * scale).float(), layer.to_dense(), linear.bias)
    per_tensor_error = activation_error(per_tensor, outlier)
    assert float(per_tensor_error[0]) < 1.2e-2  # fine for the outlier itself ...
    assert float(per_tensor_error[1:].min()) > 20 * float(per_token[1:].max())  # ... 42-63% elsewhere (50x)


@torch.no_grad()
def test_full_8_bit_activations_cannot_saturate_against_7_bit_weights():
    """fbgemm's AVX2 kernel adds pairs of uint8 x int8 products in int16 (max 32767). The worst case, codes
    255 against weights 63 everywhere, sums to 2 * 255 * 63 = 32130: the output is still exact."""
    linear = nn.Linear(64, 8)
    linear.weight.fill_(0.5)  # every weight the largest of its row: +63
    layer = Int8DynamicLinear.from_linear(linear)
    assert bool((layer.weight_int8 == 63).all())
    x = torch.ones(4, 64)  # all positive: zero point 0, every code 255
    assert torch.allclose(layer(x).double(), by_hand(x, layer), rtol=0, atol=1e-5)
    assert torch.allclose(layer(x), linear(x), rtol=1e-6)
    # int8 values up to +-127 (as checkpoints written before QMAX was 63 hold) would overflow the int16
    # sums with 8-bit codes: such a layer runs its activations in 7 bits (codes 0..127), as torch.ao does.
    layer.weight_int8.fill_(127)
    layer.weight_scale.fill_(0.5 / 127)
    assert torch.allclose(layer(x).double(), by_hand(x, layer, levels=127), rtol=0, atol=1e-5)
    assert torch.allclose(layer(x), linear(x), rtol=1e-6)


@torch.no_grad()
def test_any_leading_shape_and_dtype():
    torch.manual_seed(1)
    linear = nn.Linear(32, 24)
    layer = Int8DynamicLinear.from_linear(linear)
    x = torch.randn(2, 3, 5, 32)
    y = layer(x)
    assert y.shape == (2, 3, 5, 24)
    assert layer(x[0, 0, 0]).shape == (24,)
    assert torch.equal(layer(x.reshape(-1, 32)).view(2, 3, 5, 24), y)  # same rows, same scales
    half = layer(x.bfloat16())
    assert half.dtype == torch.bfloat16  # computed in fp32, rounded once
    assert torch.equal(half, layer(x.bfloat16().float()).bfloat16())
    assert layer(torch.randn(0, 32)).shape == (0, 24)
    assert torch.equal(layer(torch.zeros(2, 32)), layer.bias.detach().expand(2, 24))  # zeros: just the bias
    with_zeros = x.reshape(-1, 32).clone()
    with_zeros[[0, 7]] = 0.0
    assert torch.allclose(layer(with_zeros).double(), by_hand(with_zeros, layer), rtol=0, atol=1e-5)
    no_bias = nn.Linear(32, 24, bias=False)
    layer = Int8DynamicLinear.from_linear(no_bias)
    assert layer.bias is None and layer.layout_args()["bias"] is False
    assert torch.allclose(layer(x), F.linear(x, layer.to_dense()), atol=float(activation_step(x).max()) * 32)
    assert torch.allclose(layer(x).double(), by_hand(x, layer), rtol=0, atol=1e-5)


@torch.no_grad()
def test_gpt2_conv1d_is_transposed():
    model = tiny_gpt2()
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in 64, out 256)
    layer = Int8DynamicLinear.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (64, 256) and layer.weight_int8.shape == (256, 64)
    reference = nn.Linear(64, 256)
    reference.weight.copy_(conv.weight.T)
    reference.bias.copy_(conv.bias)
    assert torch.equal(layer.weight_int8, Int8DynamicLinear.from_linear(reference).weight_int8)
    step = layer.weight_scale.double().unsqueeze(1) / 2
    assert bool(((layer.to_dense().double() - conv.weight.T.double()).abs() <= step).all())
    x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(0))
    y = layer(x)
    assert torch.allclose(y.double(), by_hand(x, layer), rtol=0, atol=1e-5)
    assert float((y - conv(x)).norm() / conv(x).norm()) < 2e-2


def test_backward_goes_through_the_dequantized_weight_and_forward_is_unchanged():
    torch.manual_seed(2)
    layer = Int8DynamicLinear.from_linear(nn.Linear(48, 16))
    x = torch.randn(2, 5, 48, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y.detach(), layer(x))  # the int8 kernel both ways
    grad = torch.randn(2, 5, 16)
    y.backward(grad)
    # Straight-through: the rounding and the per-token scaling around it count as the identity.
    assert torch.allclose(x.grad, grad @ layer.to_dense(), atol=1e-6)
    assert torch.allclose(layer.bias.grad, grad.sum((0, 1)), atol=1e-6)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]  # int8 values are buffers
    layer.bias.grad = None
    y = layer(x.detach())  # only the bias needs a gradient: added outside the int8 op, autograd has it
    assert torch.equal(y.detach(), layer(x).detach())
    y.backward(grad)
    assert torch.allclose(layer.bias.grad, grad.sum((0, 1)), atol=1e-6)


@torch.no_grad()
def test_load_state_dict_and_in_place_edits_refresh_the_packed_weight():
    torch.manual_seed(3)
    a, b = Int8DynamicLinear.from_linear(nn.Linear(64, 32)), Int8DynamicLinear.from_linear(nn.Linear(64, 32))
    x = torch.randn(4, 64)
    before, expected = a(x), b(x)
    packed = a.packed_weight()
    assert a.packed_weight() is packed  # built once, reused while nothing changes
    assert set(a.state_dict()) == {"weight_int8", "weight_scale", "bias"}  # the cache is never saved
    a.load_state_dict(b.state_dict())
    assert not torch.equal(a(x), before) and torch.equal(a(x), expected)
    packed = a.packed_weight()
    a.bias.add_(1.0)  # added after the int8 op: a new bias needs no repacking
    assert torch.allclose(a(x), expected + 1.0, atol=1e-5) and a.packed_weight() is packed
    a.weight_int8.neg_()  # an in-place edit bumps the version counter
    assert torch.allclose(a(x), by_hand(x, a).float(), atol=1e-5)


def test_inference_mode_tensors_have_no_version_but_reload_still_refreshes():
    torch.manual_seed(6)
    with torch.inference_mode():
        a = Int8DynamicLinear.from_linear(nn.Linear(64, 32))
        b = Int8DynamicLinear.from_linear(nn.Linear(64, 32))
        x = torch.randn(4, 64)
        before, expected = a(x), b(x)
        assert a.weight_int8.is_inference()
        a.load_state_dict(b.state_dict())
        assert not torch.equal(a(x), before) and torch.equal(a(x), expected)


@torch.no_grad()
def test_fallback_without_fbgemm_is_the_dequantized_matmul(monkeypatch):
    torch.manual_seed(4)
    layer = Int8DynamicLinear.from_linear(nn.Linear(64, 32))
    x = torch.randn(6, 64)
    fast = layer(x)
    monkeypatch.setattr(int8_dynamic, "FBGEMM", False)
    slow = layer(x)
    assert torch.equal(slow, F.linear(x, layer.to_dense(), layer.bias))
    assert bool(((fast - slow).abs() <= activation_step(x) / 2 * layer.to_dense().abs().sum(1) + 1e-5).all())


@torch.no_grad()
def test_prepack_uses_fbgemm_and_leaves_the_engine_alone():
    torch.manual_seed(5)
    layer = Int8DynamicLinear.from_linear(nn.Linear(64, 32))
    x = torch.randn(6, 64)
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        y = layer(x)
        assert torch.backends.quantized.engine == "qnnpack"
    finally:
        torch.backends.quantized.engine = previous
    assert torch.allclose(y.double(), by_hand(x, layer), rtol=0, atol=1e-5)


# --- models -------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize(("build", "layers"), [(tiny_llama, 6), (tiny_gpt2, 4)])
def test_int8_mlps_keep_logits_close_to_fp32(build, layers):
    model = build()
    before = logits(model)
    assert len(quantize_mlps(model)) == layers
    assert not isinstance(model.lm_head, Int8DynamicLinear)
    after = logits(model)
    # Observed: relative 0.5% (Llama), 1.1% (GPT-2); max |diff| 0.004 / 0.007 on logits up to ~1.
    assert float((after - before).norm() / before.norm()) < 2e-2
    assert float((after - before).abs().max()) < 0.015
    assert torch.equal(after.argmax(-1), before.argmax(-1))


# --- storage and checkpoints --------------------------------------------------------------------


def save(model, out: Path) -> Path:
    return save_checkpoint(model, tiny_tokenizer(), out, recipe_text="name: t\n", manifest={"name": "t"},
                           model_card="# t\n")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny Llama and GPT-2 with int8 MLPs, saved as checkpoints."""
    tmp = tmp_path_factory.mktemp("int8")
    found = {}
    for name, build in (("llama", tiny_llama), ("gpt2", tiny_gpt2)):
        model = build()
        quantize_mlps(model)
        found[name] = (model, save(model, tmp / name))
    return found


def test_weights_are_stored_as_one_byte_each(saved):
    model, out = saved["llama"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if ".mlp." in key}
    ints = {k: t for k, t in tensors.items() if k.endswith(".weight_int8")}
    scales = {k: t for k, t in tensors.items() if k.endswith(".weight_scale")}
    assert len(ints) == len(scales) == 6 and set(tensors) == set(ints) | set(scales)  # Llama MLPs: no bias
    assert all(t.dtype == torch.int8 for t in ints.values())
    assert all(t.dtype == torch.float32 for t in scales.values())
    weights = 2 * 3 * 64 * 192
    int8_bytes = sum(t.numel() * t.element_size() for t in ints.values())
    scale_bytes = sum(t.numel() * t.element_size() for t in scales.values())
    assert int8_bytes == weights and scale_bytes == 2 * (192 + 192 + 64) * 4
    # Of fp32's 4 bytes per weight: 1/4, plus one 4-byte scale per row, which is 1/64 of a row of 64
    # fp32 weights (gate, up: 192 x 64) and 1/192 of a row of 192 (down: 64 x 192).
    assert (int8_bytes + scale_bytes) / (weights * 4) == pytest.approx(0.25 + (2 / 64 + 1 / 192) / 3)


def test_checkpoints_reload_exactly(saved):
    for model, out in saved.values():
        loaded = load_checkpoint(out)
        assert torch.equal(logits(loaded), logits(model))
        original = {k: v for k, v in model.state_dict().items() if ".weight_" in k}
        reloaded = loaded.state_dict()
        assert original and all(reloaded[k].dtype == v.dtype and torch.equal(reloaded[k], v)
                                for k, v in original.items())


@torch.no_grad()
def test_bf16_model_keeps_fp32_scales_and_reloads(tmp_path):
    model = tiny_llama()
    quantize_mlps(model)
    model.to(torch.bfloat16)  # a bf16 scale would lose precision, and not match the saved fp32 one
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_int8.dtype == torch.int8
    x = torch.randn(3, 64).bfloat16()
    assert layer(x).dtype == torch.bfloat16
    again = load_checkpoint(save(model, tmp_path / "bf16")).model.layers[0].mlp.up_proj
    # (Whole-model bf16 logits are not compared: Llama's rotary inv_freq reloads in another dtype.)
    assert again.weight_scale.dtype == torch.float32 and torch.equal(again(x), layer(x))


INT8_WEIGHTS = """
import torch

def probe(model, name):
    return all(m.weight_int8.dtype == torch.int8 for m in model.modules() if type(m).__name__ == "Int8DynamicLinear")
"""


def test_remote_code_reloads_exactly_without_llmshrink(saved):
    reloaded = reload_without_llmshrink({name: out for name, (_, out) in saved.items()}, IDS,
                                        layer="Int8DynamicLinear", probe=INT8_WEIGHTS)
    assert [(name, len(got["layers"])) for name, got in reloaded.items()] == [("llama", 6), ("gpt2", 4)]
    for name, got in reloaded.items():
        model, _ = saved[name]
        assert got["probe"] is True  # int8 weights
        # The layer class came from the checkpoint folder (copied by transformers), not from llmshrink.
        assert all(module.startswith(f"transformers_modules.{name}.") and module.endswith(".int8_dynamic")
                   for module in got["layers"])
        assert torch.equal(got["logits"], logits(model))


@torch.no_grad()
def test_one_token_is_quantized_with_its_own_range_without_the_per_row_scaling():
    # Decode feeds one token at a time: fbgemm's per-tensor scale is then that token's own, so the layer
    # skips the normalisation (and the QAT rounding skips it the same way).
    from llmshrink.modules.fake_quant import FakeQuantLinear

    torch.manual_seed(3)
    linear = nn.Linear(256, 128)
    layer = Int8DynamicLinear.from_linear(linear)
    fake = FakeQuantLinear.from_linear(linear, activations=True)
    for x in (torch.randn(1, 256), torch.randn(1, 1, 256) * 30, torch.randn(256)):
        y = layer(x)
        assert torch.allclose(y.double(), by_hand(x.reshape(1, -1), layer).reshape(y.shape), rtol=0, atol=1e-5)
        assert torch.allclose(fake(x), y, rtol=0, atol=1e-5 + 1e-6 * float(y.abs().max()))  # fp32 matmul
        in_batch = layer(torch.cat([x.reshape(1, -1), torch.randn(3, 256)]))[0]  # normalised with the others
        exact = linear(x).reshape(-1)
        assert relative(y.reshape(-1), exact) < 1.5e-2 and relative(in_batch, exact) < 1.5e-2  # both ~1%
