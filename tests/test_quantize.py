"""quantize pass: fp16/bf16 casts and int8-dynamic on tiny GPT-2 / Llama / BERT; errors in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    quantize_with_untied_head,
    quiet_ctx,
    relative,
    save_tiny,
    stage_error,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn

from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.int8_dynamic import Int8DynamicLinear
from llmshrink.modules.low_rank import LowRankLinear
from llmshrink.passes.low_rank import LowRankConfig
from llmshrink.passes.low_rank import apply as low_rank
from llmshrink.passes.quantize import QuantizeConfig, apply
from llmshrink.targeting import is_dense_layer

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1]])
BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}



@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits.float()




@pytest.mark.parametrize(("method", "dtype", "bound"), [("fp16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_casts_halve_the_bytes_stay_close_and_reload_in_their_dtype(tmp_path, family, method, dtype, bound):
    model = BUILDERS[family]()
    before = logits(model)
    record = apply(model, QuantizeConfig(method=method), quiet_ctx())
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert record["bytes_after"] * 2 == record["bytes_before"]
    after = logits(model)
    assert 0 < relative(after, before) < bound
    reloaded = load_checkpoint(save_tiny(model, tmp_path / family))
    assert {p.dtype for p in reloaded.parameters()} == {dtype}
    assert torch.equal(logits(reloaded), after)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_int8_dynamic_replaces_the_block_layers_keeps_head_and_reloads_exactly(tmp_path, family):
    model = BUILDERS[family]()
    dense = {name: m for name, m in model.named_modules() if is_dense_layer(m)}
    before = logits(model)
    record = apply(model, QuantizeConfig(method="int8-dynamic"), quiet_ctx())
    in_blocks = [name for name in dense if ".0." in name or ".1." in name]
    assert [layer["name"] for layer in record["layers"]] == in_blocks and len(in_blocks) >= 4
    for name, module in model.named_modules():
        if name in in_blocks:
            assert isinstance(module, Int8DynamicLinear)
    assert all(is_dense_layer(model.get_submodule(name)) for name in dense if name not in in_blocks)  # head etc.
    # Per-channel 7-bit grid (+-63, stored as int8): Gaussian rows (max ~ 3 sigma) round with a relative rms
    # error of about 3 / 63 / sqrt(12) = 1.4%; a quarter of the bytes plus a scale per row.
    assert all(layer["rel_error"] < 0.02 for layer in record["layers"])
    assert 0.25 < record["ratio"] < 0.3
    after = logits(model)
    assert 0 < relative(after, before) < 0.02  # 7-bit weights, 8-bit per-token activations
    reloaded = load_checkpoint(save_tiny(model, tmp_path / family))
    assert torch.equal(logits(reloaded), after)


def test_untied_head_runs_in_int8_while_the_embedding_stays_float(tmp_path):
    model = tiny_llama()
    before = logits(model)
    quantize_with_untied_head(model, "int8-dynamic")
    assert isinstance(model.lm_head, Int8DynamicLinear)
    after = logits(model)
    assert 0 < relative(after, before) < 0.03
    reloaded = load_checkpoint(save_tiny(model, tmp_path / "untied"))
    assert isinstance(reloaded.lm_head, Int8DynamicLinear) and torch.equal(logits(reloaded), after)


def test_compressed_layers_stay_in_their_precision_and_are_listed():
    model = tiny_llama()
    low_rank(model, LowRankConfig(targets=r".*mlp\.up_proj", rank=8), quiet_ctx())
    record = apply(model, QuantizeConfig(method="int8-dynamic"), quiet_ctx())
    assert record["kept"] == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8DynamicLinear)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"method": "mixed"}, ".budget: required for method mixed: the targets' bytes after quantizing, as a "
                              "fraction in (0, 1] of their fp32 bytes, got None"),
        ({"method": "int4"}, ".method: 'int4' is not a method; allowed: fp16, bf16, int8-dynamic, "
                             "bnb-nf4, bnb-fp4, bnb-int8, mixed, got 'int4'"),
        ({}, ".method: required field is missing"),
    ],
)
def test_bad_config_is_one_line(body, message):
    assert stage_error("quantize", body) == message


def test_tied_head_and_mixed_dtypes_are_refused():
    model = tiny_llama()
    with pytest.raises(LlmshrinkError) as info:
        apply(model, QuantizeConfig(method="int8-dynamic", targets="lm_head"), quiet_ctx())
    assert str(info.value) == ("quantize.targets: lm_head shares its weight with model.embed_tokens "
                               "(tied embeddings); exclude it, or set tied_embeddings: untie to run it in int8 alone")
    model.model.layers[0].mlp.up_proj.to(torch.bfloat16)
    with pytest.raises(LlmshrinkError) as info:
        apply(model, QuantizeConfig(method="fp16"), quiet_ctx())
    assert str(info.value) == "quantize.method: fp16 needs a float32 model; its parameters are ['bfloat16', 'float32']"
    apply(tiny_llama(), QuantizeConfig(method="int8-dynamic"), quiet_ctx())
    with pytest.raises(LlmshrinkError, match=r"^quantize.targets: 'nothing' matches no Linear/Conv1D layer"):
        apply(tiny_llama(), QuantizeConfig(method="int8-dynamic", targets="nothing"), quiet_ctx())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"method": "int8-dynamic", "embeddings": True, "embedding_targets": "(["},
         ".embedding_targets: not a valid regex (unterminated character set at position 1), got '(['"),
        ({"method": "fp16", "embeddings": True}, ".embeddings: only for method int8-dynamic, not 'fp16', got True"),
        ({"method": "mixed", "budget": 0.5, "embeddings": True},
         ".embeddings: only for method int8-dynamic, not 'mixed', got True"),
        ({"method": "bnb-nf4", "embedding_targets": ".*"},
         ".embedding_targets: only for method int8-dynamic, not 'bnb-nf4', got '.*'"),
        ({"method": "int8-dynamic", "embeddings": "maybe"}, ".embeddings: input should be a valid boolean, got 'maybe'"),
    ],
)
def test_embedding_settings_are_checked_when_the_recipe_is_read(body, message):
    assert stage_error("quantize", body) == message


def test_embeddings_are_off_by_default_and_the_tables_stay_float():
    cfg = QuantizeConfig(method="int8-dynamic")
    assert cfg.embeddings is False and cfg.embedding_targets == r".*embeddings.*|.*embed_tokens"
    model = tiny_bert()
    record = apply(model, cfg, quiet_ctx())
    assert "embeddings" not in record and isinstance(model.bert.embeddings.word_embeddings, nn.Embedding)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
