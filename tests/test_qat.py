"""qat pass: FakeQuantLinear trains through int8 rounding; quantize int8-dynamic then converts it exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import calibrated, tiny_gpt2, tiny_llama, tiny_tokenizer

from llmshrink.checkpoint import save_checkpoint
from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.errors import LlmshrinkError
from llmshrink.modules import int8_dynamic
from llmshrink.modules.fake_quant import FakeQuantLinear, round_activations, round_weight
from llmshrink.modules.int8_dynamic import Int8DynamicLinear
from llmshrink.passes.distill import DistillConfig
from llmshrink.passes.distill import apply as distill
from llmshrink.passes.qat import QatConfig, apply
from llmshrink.passes.quantize import QuantizeConfig
from llmshrink.passes.quantize import apply as quantize

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1]])


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits


def test_rounding_is_on_the_grid_with_a_straight_through_gradient():
    torch.manual_seed(0)
    weight = torch.randn(5, 7, requires_grad=True)
    rounded = round_weight(weight)
    scale = weight.detach().abs().amax(dim=1, keepdim=True) / 63
    steps = rounded.detach() / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 63 + 1e-4
    assert (steps.abs().amax(dim=1) > 63 - 1e-4).all()  # each row's largest weight at +-63
    assert (rounded - weight).abs().max() <= scale.max() / 2 + 1e-7
    rounded.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # the identity, not round's zero gradient


def test_activations_are_rounded_per_token_with_a_straight_through_gradient():
    torch.manual_seed(1)
    x = torch.randn(6, 40)
    x[2] *= 100  # an outlier token
    x[4] = 0.0
    x.requires_grad_()
    xq = round_activations(x)
    amax = x.detach().abs().amax(dim=1, keepdim=True)
    normed = (xq.detach() / amax.clamp(min=1e-30)).double()
    # Every row normalized to max|x| = 1, so the tensor's range is [-1, 1]: one step of 2/255 for all rows,
    # zero point 128 (fbgemm's: round(-low / scale) = round(127.5) = 128, half to even).
    step = 2 / 255
    codes = normed / step + 128
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= -1e-3 and codes.max() <= 255 + 1e-3
    error = (xq - x).detach().abs()
    assert (error <= amax * step / 2 * (1 + 1e-4) + 1e-7).all()  # each row within half its own step
    assert error[2].max() > 10 * error[[0, 1, 3, 5]].max()  # the outlier row's step is its own ...
    assert error[[0, 1, 3, 5]].max() < 0.02  # ... and does not coarsen the others (|x| ~ 2.5: step ~0.02)
    assert not xq[4].any()  # a row of zeros stays zeros
    xq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert round_activations(torch.zeros(0, 40)).shape == (0, 40)


@pytest.mark.skipif(not int8_dynamic.FBGEMM, reason="needs fbgemm (x86 CPU torch)")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@torch.no_grad()
def test_fake_quant_forward_is_the_int8_layers_forward():
    torch.manual_seed(2)
    linear = torch.nn.Linear(96, 48)
    fake = FakeQuantLinear.from_linear(linear, activations=True)
    real = Int8DynamicLinear.from_linear(linear)
    for seed in range(3):
        x = torch.randn(4, 9, 96, generator=torch.Generator().manual_seed(seed))
        x[0, seed] *= 50
        expected = real(x)
        # The same codes and weights; only the float sums run in another order (observed <= 1.5e-5 on |y| up
        # to ~110, where one code off would move an output by ~1e-3 or more).
        assert torch.allclose(fake(x), expected, rtol=1e-6, atol=1e-5)
        weight_only = F.linear(x, real.to_dense(), linear.bias)
        assert (fake(x) - weight_only).abs().max() > 1e-3  # the activations really are rounded


def test_qat_layers_compute_with_rounded_weights_and_keep_the_head():
    model = tiny_llama()
    record = apply(model, QatConfig(), calibrated())
    names = [layer["name"] for layer in record["layers"]]
    assert len(names) == 14 and all(".layers." in n for n in names)  # 7 per block, lm_head untouched
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, FakeQuantLinear) and type(model.lm_head) is torch.nn.Linear
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), F.linear(x, round_weight(layer.weight)))
    # 7-bit weights: a uniform rounding error of max|w| / 63 / sqrt(12), against Gaussian rows whose max|w| is
    # ~3 sigma: ~1.3% (observed 1.1-1.4%).
    assert all(0 < entry["rel_error"] < 0.02 for entry in record["layers"])


@pytest.mark.parametrize("activations", [False, True])
def test_trained_qat_model_converts_to_int8_exactly(tmp_path, activations):
    model = tiny_gpt2()
    before = copy.deepcopy(model)
    ctx = calibrated(tokens=400)
    apply(model, QatConfig(activations=activations), ctx)
    distill(model, DistillConfig(steps=3, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=0, alpha=0.0), ctx)
    trained = {name: m.to_dense() for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    moved = before.transformer.h[0].mlp.c_fc.weight.T - model.transformer.h[0].mlp.c_fc.weight
    assert moved.abs().max() > 1e-3  # the straight-through gradient trained the float weights
    fake = logits(model)
    reloaded = load_checkpoint(save_checkpoint(model, tiny_tokenizer(), tmp_path / "qat", recipe_text="name: t\n",
                                               manifest={"name": "t"}, model_card="# t\n"))
    assert torch.equal(logits(reloaded), fake)
    quantize(model, QuantizeConfig(method="int8-dynamic"), ctx)
    for name, weight in trained.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Int8DynamicLinear)
        assert torch.equal(layer.to_dense(), weight)  # exactly the grid point each weight trained at
    converted = logits(model)
    # What is left is the kernel's own activation rounding, which activations: true trains against, to the
    # same codes: float summation order only (observed 1e-7; without it 6e-4).
    error = float((converted - fake).norm() / fake.norm())
    assert error < (1e-5 if activations else 5e-3), error


def test_tied_head_and_repeated_qat_are_refused():
    model = tiny_llama()
    with pytest.raises(LlmshrinkError) as info:
        apply(model, QatConfig(targets="lm_head"), calibrated())
    assert str(info.value) == ("qat.targets: lm_head shares its weight with model.embed_tokens (tied embeddings); "
                               "exclude it (the default targets do)")
    apply(model, QatConfig(), calibrated())
    with pytest.raises(LlmshrinkError) as info:
        apply(model, QatConfig(), calibrated())
    assert str(info.value) == "qat.targets: every layer matching '.*\\\\.\\\\d+\\\\..*' is already fake-quantized"
