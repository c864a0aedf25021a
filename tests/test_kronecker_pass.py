"""The kronecker pass on tiny GPT-2 (Conv1D, fused qkv) and Llama (GQA, SwiGLU, tied embeddings)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.kronecker import KroneckerLinear
from llmshrink.passes.kronecker import KroneckerConfig, apply
from llmshrink.specs import DataSpec
from llmshrink.targeting import replace_module

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3]])


def ctx(**kw) -> Context:
    return Context(tokenizer=None, log=lambda _: None, **kw)


def densified(model: nn.Module) -> nn.Module:
    """The same model with every KroneckerLinear swapped for the nn.Linear it stands for."""
    for name, module in list(model.named_modules()):
        if isinstance(module, KroneckerLinear):
            replace_module(model, name, module.to_linear())
    return model


@torch.no_grad()
def test_gpt2_conv1d_and_fused_qkv_are_replaced_faithfully():
    model = tiny_gpt2()
    cfg = KroneckerConfig(targets=r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_fc|mlp\.c_proj)", a_shape=(8, 8),
                          rank=2, permute=True, search_iters=2)
    record = apply(model, cfg, ctx())
    names = [layer["name"] for layer in record["layers"]]
    assert names == [f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")]
    qkv = record["layers"][0]
    assert qkv["shape"] == [192, 64] and qkv["b_shape"] == [24, 8]  # fused q,k,v: out = 3 x 64
    assert record["params_after"] == sum(2 * (8 * 8 + layer["b_shape"][0] * layer["b_shape"][1])
                                         for layer in record["layers"])
    for layer in record["layers"]:
        assert layer["rel_error"] <= layer["rel_error_no_permutation"] + 1e-6
    # The Kronecker forward (Conv1D semantics: x @ W + b) equals a dense layer holding to_dense().
    logits = model(IDS).logits
    assert torch.allclose(logits, densified(model)(IDS).logits, atol=1e-5)


@torch.no_grad()
def test_llama_gqa_projections_and_exact_weights():
    model = tiny_llama()
    k_proj = model.model.layers[0].self_attn.k_proj  # GQA: 2 kv heads x 16 = 32 outputs, 64 inputs
    a, b = torch.randn(4, 8), torch.randn(8, 8)
    k_proj.weight.copy_(torch.kron(a, b))
    cfg = KroneckerConfig(targets=r".*\.(q|k|v|o|gate|up|down)_proj", layers=[0], a_shape=(4, 8), rank=1,
                          permute=False)
    record = apply(model, cfg, ctx())
    assert len(record["layers"]) == 7
    k_record = next(layer for layer in record["layers"] if layer["name"].endswith("k_proj"))
    assert k_record["shape"] == [32, 64] and k_record["rel_error"] < 1e-5
    assert isinstance(model.model.layers[1].mlp.up_proj, nn.Linear)  # layer filter respected


def test_tied_lm_head_is_refused_then_untied_on_request():
    model = tiny_llama()
    with pytest.raises(LlmshrinkError) as info:
        apply(model, KroneckerConfig(targets="lm_head", a_shape=(8, 8), permute=False), ctx())
    assert str(info.value) == (
        "kronecker.targets: lm_head shares its weight with model.embed_tokens (tied embeddings); exclude it, "
        "or set tied_embeddings: untie to compress it alone (the other stays dense)"
    )
    embedding = model.model.embed_tokens.weight.detach().clone()
    record = apply(model, KroneckerConfig(targets="lm_head", a_shape=(8, 8), permute=False,
                                          tied_embeddings="untie"), ctx())
    assert record["untied"] == ["lm_head"]
    assert model.config.tie_word_embeddings is False
    assert isinstance(model.lm_head, KroneckerLinear)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding itself is untouched


def test_shape_choice_from_ratio_fits_the_budget():
    model = tiny_gpt2()
    record = apply(model, KroneckerConfig(targets=r".*mlp\.c_fc", ratio=0.2, permute=False), ctx())
    for layer in record["layers"]:
        assert layer["params_after"] <= 0.2 * 256 * 64
        assert layer["a_shape"][0] * layer["b_shape"][0] == 256 and layer["a_shape"][1] * layer["b_shape"][1] == 64


def test_select_layers_keeps_the_least_sensitive_blocks(tiny_text):
    from conftest import tiny_tokenizer

    model = tiny_gpt2()
    context = Context(tokenizer=tiny_tokenizer(), log=lambda _: None, data=DataSpec(source=str(tiny_text)))
    cfg = KroneckerConfig(targets=r".*mlp\.c_(fc|proj)", a_shape=(8, 8), select_layers=1, calibration_tokens=128,
                          permute=False)
    record = apply(model, cfg, context)
    scores = {int(k): v for k, v in record["selection"]["calibration_ppl"].items()}
    assert sorted(scores) == [0, 1] and scores[0] != scores[1]
    best, worst = sorted(scores, key=scores.get)
    assert record["selection"]["chosen"] == [best]
    assert [layer["name"] for layer in record["layers"]] == [f"transformer.h.{best}.mlp.c_fc",
                                                             f"transformer.h.{best}.mlp.c_proj"]
    assert not isinstance(model.transformer.h[worst].mlp.c_proj, KroneckerLinear)  # left dense

    # The score is the calibration perplexity with that block alone compressed: recompute it by hand.
    from llmshrink.distill.data import token_ids
    from llmshrink.eval.perplexity import perplexity

    reference = tiny_gpt2()
    for name in (f"transformer.h.{worst}.mlp.c_fc", f"transformer.h.{worst}.mlp.c_proj"):
        replace_module(reference, name, KroneckerLinear.from_linear(reference.get_submodule(name), (8, 8),
                                                                    (32, 8) if "c_fc" in name else (8, 32)))
    ids = token_ids(DataSpec(source=str(tiny_text)), tiny_tokenizer())[:128]
    assert perplexity(reference, ids, 128, 128, progress=False).ppl == pytest.approx(scores[worst], rel=1e-4)


def test_targets_that_match_nothing_say_what_names_look_like():
    with pytest.raises(LlmshrinkError, match=r"^targets: 'nothing' matches no Linear/Conv1D layer; layer names "
                                             r"look like transformer\.h\.0\.attn\.c_attn, "):
        apply(tiny_gpt2(), KroneckerConfig(targets="nothing"), ctx())
