"""The low_rank pass: plain, randomized and activation-aware SVD on GPT-2 (Conv1D), Llama and BERT."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import (
    AUTO,
    n_params,
    reload_without_llmshrink,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)
from torch import nn

from llmshrink.checkpoint import save_checkpoint
from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError, RecipeError
from llmshrink.modules.low_rank import LowRankLinear, dense_weight
from llmshrink.passes.low_rank import LowRankConfig, apply, choose_rank
from llmshrink.recipe import load_recipe
from llmshrink.specs import DataSpec

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3]])
BLOCK_LAYERS = r".*\.\d+\..*"



def ctx(text: Path | None = None) -> Context:
    data = DataSpec(source=str(text)) if text is not None else None
    return Context(tokenizer=tiny_tokenizer(), data=data, log=lambda _: None)


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits



@torch.no_grad()
def make_low_rank_(model: nn.Module, pattern: str, rank: int) -> None:
    """Overwrite every matching layer's weight with an exact rank-`rank` matrix (std ~0.02)."""
    from llmshrink.targeting import find_targets

    gen = torch.Generator().manual_seed(0)
    for _, module in find_targets(model, pattern):
        a, b = module.weight.shape
        module.weight.copy_(torch.randn(a, rank, generator=gen) @ torch.randn(rank, b, generator=gen) * 0.02 / rank**0.5)


@pytest.mark.parametrize("mode", [{}, {"randomized": True}, {"activation_aware": True, "calibration_tokens": 256}],
                         ids=["svd", "randomized", "activation_aware"])
def test_exact_low_rank_weights_are_recovered_and_logits_unchanged(tiny_text, mode):
    model = tiny_gpt2()  # Conv1D everywhere, fused qkv c_attn (192 x 64)
    make_low_rank_(model, BLOCK_LAYERS, rank=4)
    before, params_before = logits(model), n_params(model)
    record = apply(model, LowRankConfig(rank=4, **mode), ctx(tiny_text))
    names = [layer["name"] for layer in record["layers"]]
    assert names == [f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                        "mlp.c_proj")]
    assert all(isinstance(model.get_submodule(name), LowRankLinear) for name in names)
    assert [layer["shape"] for layer in record["layers"][:4]] == [[192, 64], [64, 64], [256, 64], [64, 256]]
    assert max(layer["rel_error"] for layer in record["layers"]) < 1e-5
    assert record["params_after"] == 2 * 4 * (256 + 128 + 320 + 320)
    assert params_before - n_params(model) == record["params_before"] - record["params_after"]
    assert torch.allclose(logits(model), before, atol=1e-5)
    if mode.get("activation_aware"):
        assert record["calibration_tokens"] == 256
        assert max(layer["rel_output_error"] for layer in record["layers"]) < 1e-5


def test_rank_that_saves_nothing_is_skipped():
    model = tiny_gpt2()
    before = logits(model)
    record = apply(model, LowRankConfig(rank=64), ctx())  # 64 = min(m, n) of every layer: no compression
    assert record["layers"] == [] and record["params_after"] == 0
    assert len(record["skipped"]) == 8 and not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert torch.equal(logits(model), before)
    # rank 32: c_attn 192x64 saves (32 x 256 < 12288), the square c_proj 64x64 does not (32 x 128 = 4096).
    record = apply(model, LowRankConfig(rank=32, targets=r"transformer\.h\.0\.attn\..*"), ctx())
    assert [layer["name"] for layer in record["layers"]] == ["transformer.h.0.attn.c_attn"]
    assert record["skipped"] == [{"name": "transformer.h.0.attn.c_proj", "shape": [64, 64], "rank": 32,
                                  "reason": "rank 32 x (64 + 64) = 4096 params >= 4096 dense"}]


class OneLayer(nn.Module):
    """Embeddings that span only a `dim`-dimensional subspace (plus tiny noise), then one Linear."""

    def __init__(self, dim: int = 4, noise: float = 1e-3):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(128, 64)
        self.proj = nn.Linear(64, 96)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(128, dim, generator=gen) @ torch.randn(dim, 64, generator=gen)
                                    + noise * torch.randn(128, 64, generator=gen))

    def forward(self, input_ids):
        return self.proj(self.embed(input_ids))


@torch.no_grad()
def test_energy_and_ratio_ranks_on_known_singular_values():
    model = OneLayer()
    q_out, _ = torch.linalg.qr(torch.randn(96, 96, generator=torch.Generator().manual_seed(1)))
    q_in, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(2)))
    spectrum = torch.tensor([4.0, 3.0, 2.0, 1.0])  # squared: 16, 9, 4, 1 of 30
    model.proj.weight.copy_(q_out[:, :4] @ torch.diag(spectrum) @ q_in[:, :4].T)

    def ranks(**rule):
        cfg = LowRankConfig(targets="proj", **rule)
        return choose_rank(spectrum, 96, 64, cfg), choose_rank(torch.linalg.svdvals(model.proj.weight), 96, 64, cfg)

    # energy: the smallest k with (16 + ... + s_k²) / 30 >= energy.
    assert ranks(energy=0.5) == (1, 1)  # 16/30 = 0.53
    assert ranks(energy=0.8) == (2, 2)  # 25/30 = 0.83
    assert ranks(energy=0.9) == (3, 3)  # 29/30 = 0.97
    assert ranks(energy=1.0) == (4, 4)  # float noise in the trailing singular values does not add ranks
    assert ranks(ratio=0.25) == (9, 9)  # floor(0.25 * 96 * 64 / 160) = floor(9.6)
    assert ranks(ratio=0.1) == (3, 3)  # floor(0.1 * 6144 / 160) = floor(3.84)
    for randomized in (False, True):
        record = apply(copy.deepcopy(model), LowRankConfig(targets="proj", energy=0.8, randomized=randomized), ctx())
        layer = record["layers"][0]
        assert layer["rank"] == 2 and layer["params_after"] == 2 * 160
        assert layer["rel_error"] == pytest.approx((5 / 30) ** 0.5, abs=1e-5)  # the dropped 2² + 1²
    with pytest.raises(LlmshrinkError) as info:
        apply(model, LowRankConfig(targets="proj", ratio=0.01), ctx())
    assert str(info.value) == "low_rank: proj: ratio 0.01 gives rank 0 for 96x64; rank 1 needs ratio >= 0.02604"


def test_ratio_fix_is_exact_on_round_products():
    # 0.5 * 64 * 64 / 128 = 16 exactly; floating point must not floor it to 15.
    assert choose_rank(None, 64, 64, LowRankConfig(ratio=0.5)) == 16
    assert choose_rank(None, 576, 1536, LowRankConfig(ratio=0.5)) == 209  # the recipe's MLPs


@torch.no_grad()
def test_activation_aware_minimises_output_error_on_correlated_inputs(tiny_text):
    # Inputs live in a 4-dimensional subspace: whitening spends the rank there, plain SVD does not know.
    model = OneLayer()
    weight = model.proj.weight.detach().clone()
    record = apply(copy.deepcopy(model), LowRankConfig(targets="proj", rank=4, activation_aware=True,
                                                       calibration_tokens=512), ctx(tiny_text))
    layer = record["layers"][0]
    assert layer["rel_output_error"] < 0.01 < 0.5 < layer["rel_output_error_plain"]
    # The recorded output error is ||(W - Ŵ) X|| / ||W X|| on the very calibration inputs.
    plain, whitened = copy.deepcopy(model), copy.deepcopy(model)
    plain_record = apply(plain, LowRankConfig(targets="proj", rank=4), ctx())
    assert layer["rel_error"] > plain_record["layers"][0]["rel_error"]  # plain SVD is best in weight norm
    apply(whitened, LowRankConfig(targets="proj", rank=4, activation_aware=True, calibration_tokens=512),
          ctx(tiny_text))
    x = model.embed(ctx(tiny_text).train_token_ids()[:512])
    for compressed, key in ((whitened, "rel_output_error"), (plain, "rel_output_error_plain")):
        error = (x @ (compressed.proj.to_dense() - weight).T).norm() / (x @ weight.T).norm()
        assert float(error) == pytest.approx(layer[key], abs=1e-4)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_activation_aware_tracks_the_dense_model_better(tiny_text, build):
    # Perplexity of a random tiny model sits near uniform (~128) and moves by about ±1 in either direction
    # under compression, so "lower perplexity" would be chance here; the KL divergence from the dense model
    # on held-out text of the calibration kind is what the whitening improves, and it does robustly.
    context = ctx(tiny_text)
    held_out = context.train_token_ids()[1024:2048].reshape(8, 128)
    dense = build()
    reference = logits(dense, held_out).log_softmax(-1)
    kl = {}
    for aware in (False, True):
        model = copy.deepcopy(dense)
        record = apply(model, LowRankConfig(rank=8, activation_aware=aware, calibration_tokens=1024), context)
        compressed = logits(model, held_out).log_softmax(-1)
        kl[aware] = float((reference.exp() * (reference - compressed)).sum(-1).mean())
        if aware:  # on each layer's own inputs, the whitened factors have the lower output error
            assert all(layer["rel_output_error"] < layer["rel_output_error_plain"] for layer in record["layers"])
    assert kl[True] < 0.85 * kl[False]


@torch.no_grad()
def test_llama_gqa_and_swiglu_projections():
    model = tiny_llama()
    record = apply(model, LowRankConfig(ratio=0.5, layers=[0]), ctx())
    shapes = {layer["name"].rsplit(".", 1)[1]: (layer["shape"], layer["rank"]) for layer in record["layers"]}
    assert shapes == {"q_proj": ([64, 64], 16), "k_proj": ([32, 64], 10), "v_proj": ([32, 64], 10),
                      "o_proj": ([64, 64], 16), "gate_proj": ([192, 64], 24), "up_proj": ([192, 64], 24),
                      "down_proj": ([64, 192], 24)}
    assert isinstance(model.model.layers[1].mlp.up_proj, nn.Linear)  # layer filter respected
    assert model.lm_head.weight is model.model.embed_tokens.weight  # untouched, still tied
    k_proj = model.model.layers[0].self_attn.k_proj
    assert torch.allclose(k_proj(torch.ones(3, 64)), torch.ones(3, 64) @ k_proj.to_dense().T, atol=1e-6)


def test_tied_lm_head_is_refused_then_untied_on_request(tmp_path):
    model = tiny_llama()
    with pytest.raises(LlmshrinkError) as info:
        apply(model, LowRankConfig(targets=r"lm_head|model\.layers\.0\.mlp\.up_proj", rank=8), ctx())
    assert str(info.value) == (
        "low_rank.targets: lm_head shares its weight with model.embed_tokens (tied embeddings); exclude it, "
        "or set tied_embeddings: untie to compress it alone (the other stays dense)"
    )
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # refused before anything changed
    embedding = model.model.embed_tokens.weight.detach().clone()
    record = apply(model, LowRankConfig(targets="lm_head", rank=8, tied_embeddings="untie"), ctx())
    assert record["untied"] == ["lm_head"] and model.config.tie_word_embeddings is False
    assert isinstance(model.lm_head, LowRankLinear) and record["layers"][0]["shape"] == [128, 64]
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert torch.equal(logits(load_checkpoint(save(model, tmp_path / "untied"))), logits(model))


def test_bert_encoder_and_its_tied_decoder(tiny_text):
    model = tiny_bert()
    ids = torch.tensor([[2, 7, 40, 3, 99, 12]])
    params_before = n_params(model)
    record = apply(model, LowRankConfig(ratio=0.5, activation_aware=True, calibration_tokens=256), ctx(tiny_text))
    assert len(record["layers"]) == 12  # query, key, value, attention.output, intermediate, output x 2 blocks
    assert record["layers"][4] == {**record["layers"][4], "name": "bert.encoder.layer.0.intermediate.dense",
                                   "shape": [128, 64], "rank": 21}
    assert params_before - n_params(model) == record["params_before"] - record["params_after"] > 0
    assert logits(model, ids).shape == (1, 6, 128)
    with pytest.raises(LlmshrinkError, match=r"^low_rank\.targets: cls\.predictions\.decoder shares its weight "
                                             r"with bert\.embeddings\.word_embeddings \(tied embeddings\)"):
        apply(model, LowRankConfig(targets=r"cls\.predictions\.decoder", rank=4), ctx())


RECIPE = "name: tiny\noutput: {dir: out/tiny}\n"


def save(model: nn.Module, out: Path) -> Path:
    manifest = {"name": "tiny", "base_model": {"id": "tiny-random"}, "passes": []}
    return save_checkpoint(model, tiny_tokenizer(), out, recipe_text=RECIPE, manifest=manifest, model_card="# tiny\n")


def test_checkpoints_reload_exactly_with_llmshrink_and_remote_code(tmp_path, tiny_text):
    models = {"gpt2": tiny_gpt2(), "llama": tiny_llama(), "bert": tiny_bert()}
    outs = {}
    for name, model in models.items():
        apply(model, LowRankConfig(ratio=0.3, activation_aware=name == "llama", calibration_tokens=128),
              ctx(tiny_text))
        outs[name] = save(model, tmp_path / name)
        loaded = load_checkpoint(outs[name])
        assert torch.equal(logits(loaded), logits(model))
        assert n_params(loaded) == n_params(model)
    reloaded = reload_without_llmshrink(outs, IDS, auto=AUTO, layer="LowRankLinear")
    assert list(reloaded) == list(models)
    for name, got in reloaded.items():
        assert got["layers"] and all(module.startswith(f"transformers_modules.{name}.")
                                     and module.endswith(".low_rank") for module in got["layers"])
        assert torch.equal(got["logits"], logits(models[name]))


def test_layer_from_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 16)  # weight stored in x out: 16 x 48
    with torch.no_grad():
        conv.bias.normal_()
    layer = LowRankLinear.from_linear(conv, rank=16)  # full rank: exact
    x = torch.randn(2, 5, 16)
    assert torch.allclose(layer(x), conv(x), atol=1e-5)
    assert layer.layout_args() == {"in_features": 16, "out_features": 48, "rank": 16, "bias": True}
    assert torch.allclose(layer.to_dense(), dense_weight(conv), atol=1e-5)
    with pytest.raises(ValueError, match=r"rank 17 must be between 1 and min\(48, 16\) = 16"):
        LowRankLinear(16, 48, rank=17)


RECIPE_BASE = "name: t\nmodel: {id: some/dir}\nstages:\n  - low_rank: RULE\noutput: {dir: out/t}\n"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{rank: 8, energy: 0.9}", "stages[0].low_rank: give exactly one of rank, energy or ratio (found rank and "
                                   "energy), got {'rank': 8, 'energy': 0.9}"),
        ("{targets: '.*'}", "stages[0].low_rank: give exactly one of rank, energy or ratio (found none), got "
                            "{'targets': '.*'}"),
        ("{ratio: 1.5}", "stages[0].low_rank.ratio: input should be less than 1, got 1.5"),
    ],
)
def test_recipe_errors_are_one_line(tmp_path, rule, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE_BASE.replace("RULE", rule))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: {message}"


def test_pass_errors_are_one_line():
    with pytest.raises(LlmshrinkError) as info:
        apply(tiny_gpt2(), LowRankConfig(rank=100), ctx())
    assert str(info.value) == "low_rank: transformer.h.0.attn.c_attn: rank 100 exceeds min(192, 64) = 64"
    with pytest.raises(LlmshrinkError, match=r"^low_rank\.targets: 'nothing' matches no Linear/Conv1D layer; "
                                             r"layer names look like transformer\.h\.0\.attn\.c_attn, "):
        apply(tiny_gpt2(), LowRankConfig(targets="nothing", rank=4), ctx())
    with pytest.raises(LlmshrinkError, match=r"^this pass needs training text: add a `data:` section"):
        apply(tiny_gpt2(), LowRankConfig(rank=4, activation_aware=True), ctx())


def test_calibration_shorter_than_one_window_still_counts_every_token():
    from llmshrink.passes.low_rank import input_grams

    model = tiny_gpt2()
    ids = torch.arange(2, 42)  # 40 tokens: less than one calibration window (128 on this model)
    layer = model.transformer.h[0].mlp.c_fc
    (gram,) = input_grams(model, [layer], ids)
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].reshape(-1, 64).double()))
    model(input_ids=ids[None])
    handle.remove()
    assert torch.allclose(gram, seen["x"].T @ seen["x"], rtol=1e-6, atol=1e-8)


def test_embeddings_stay_dense_unless_asked():
    # embeddings: false (the default) leaves every nn.Embedding alone and adds no "embeddings" key to the record;
    # the factorised tables themselves: tests/test_low_rank_embedding.py.
    model = tiny_bert(tie_word_embeddings=False)
    record = apply(model, LowRankConfig(rank=8), ctx())
    assert "embeddings" not in record and type(model.bert.embeddings.word_embeddings) is nn.Embedding
    assert LowRankConfig(rank=8).embedding_targets == r".*word_embeddings|.*embed_tokens|.*wte"
    record = apply(model, LowRankConfig(rank=8, targets=None, embeddings=True), ctx())  # targets: null
    assert record["layers"] == [] and [e["name"] for e in record["embeddings"]] == ["bert.embeddings.word_embeddings"]
