"""qat pass: FakeQuantLinear trains through int8 rounding; quantize int8-dynamic then converts it exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import calibrated, tiny_gpt2, tiny_llama, tiny_tokenizer

from llmshrink.checkpoint import load_checkpoint, save_checkpoint
from llmshrink.errors import LlmshrinkError
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
    scale = weight.detach().abs().amax(dim=1, keepdim=True) / 127
    steps = rounded.detach() / scale
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 127 + 1e-4
    assert (rounded - weight).abs().max() <= scale.max() / 2 + 1e-7
    rounded.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # the identity, not round's zero gradient
    x = torch.randn(3, 7)
    xq = round_activations(x)
    step = (x.max() - x.min()) / 127
    assert 0 < (xq - x).abs().max() <= step / 2 + 1e-6 and len(xq.unique()) <= 128


def test_qat_layers_compute_with_rounded_weights_and_keep_the_head():
    model = tiny_llama()
    record = apply(model, QatConfig(), calibrated())
    names = [layer["name"] for layer in record["layers"]]
    assert len(names) == 14 and all(".layers." in n for n in names)  # 7 per block, lm_head untouched
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, FakeQuantLinear) and type(model.lm_head) is torch.nn.Linear
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), F.linear(x, round_weight(layer.weight)))
    assert all(0 < entry["rel_error"] < 0.01 for entry in record["layers"])


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
    # What is left is the kernel's own activation rounding, which activations: true trains against.
    error = float((converted - fake).norm() / fake.norm())
    assert error < (1e-3 if activations else 3e-2), error


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
