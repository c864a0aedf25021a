"""LowRankEmbedding and the low_rank pass's `embeddings: true`: ALBERT's factorised word table on BERT and Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    AUTO,
    n_params,
    quiet_ctx,
    recipe_error,
    reload_without_llmshrink,
    save_tiny,
    tiny_bert,
    tiny_gemma3,
    tiny_llama,
    tiny_tokenizer,
)
from torch import nn

from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.low_rank_embedding import LowRankEmbedding
from llmshrink.passes.low_rank import LowRankConfig, apply
from llmshrink.specs import DataSpec

IDS = torch.tensor([[2, 7, 40, 3, 0, 99, 12, 0]])  # 0: BERT's padding token
V, H, R = 128, 64, 8
WORD = "bert.embeddings.word_embeddings"


def table(rows: int = V, dim: int = H, padding_idx: int | None = None, seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(rows, dim, padding_idx=padding_idx)


def relative_tail(weight: torch.Tensor, rank: int) -> float:
    """sqrt(sum of the discarded squared singular values / sum of all of them): Eckart–Young's error."""
    power = torch.linalg.svdvals(weight.double()) ** 2
    return float((power[rank:].sum() / power.sum()).sqrt())


def tiny_bert_classifier(seed: int = 0):
    """A BertForSequenceClassification built as conftest.tiny_bert builds its masked LM."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=128, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# --- the layer ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_forward_is_a_lookup_in_the_dense_product():
    layer = LowRankEmbedding.from_embedding(table(), R)
    ids = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(layer(ids), F.embedding(ids, layer.to_dense()), atol=1e-6)
    assert layer(ids).shape == (3, 11, H) and layer.table.shape == (V, R) and layer.proj.shape == (R, H)
    assert sum(p.numel() for p in layer.parameters()) == V * R + R * H
    assert layer.layout_args() == {"num_embeddings": V, "embedding_dim": H, "rank": R, "padding_idx": None}
    with pytest.raises(ValueError, match=r"^rank 65 must be between 1 and min\(128, 64\) = 64$"):
        LowRankEmbedding(V, H, rank=65)


@torch.no_grad()
@pytest.mark.parametrize("randomized", [False, True], ids=["svd", "randomized"])
def test_full_rank_is_exact_and_rank_r_error_is_the_discarded_spectrum(randomized):
    dense = table()
    full = LowRankEmbedding.from_embedding(dense, H, randomized=randomized)
    assert torch.allclose(full.to_dense(), dense.weight, atol=1e-5)
    torch.manual_seed(0)
    for rank in (1, 8, 32):
        layer = LowRankEmbedding.from_embedding(dense, rank, randomized=randomized)
        error = float((layer.to_dense() - dense.weight).norm() / dense.weight.norm())
        # a random Gaussian table has a flat spectrum: the sketch is approximate, the full SVD is not
        assert error == pytest.approx(relative_tail(dense.weight, rank), abs=1e-5 if not randomized else 2e-2)


@torch.no_grad()
def test_padding_row_stays_exactly_zero_and_gets_no_gradient():
    dense = table(padding_idx=0)  # nn.Embedding zeroes the padding row
    layer = LowRankEmbedding.from_embedding(dense, R)
    assert layer.padding_idx == 0 and torch.equal(layer(torch.tensor([0, 0])), torch.zeros(2, H))
    assert torch.equal(layer.table[0], torch.zeros(R)) and layer(torch.tensor([5])).abs().sum() > 0
    with torch.enable_grad():
        layer(torch.tensor([0, 5, 0])).sum().backward()
    assert torch.equal(layer.table.grad[0], torch.zeros(R)) and layer.table.grad[5].abs().sum() > 0
    dense.weight[0] = 1.0  # a padding row that holds values is approximated like any other
    assert LowRankEmbedding.from_embedding(dense, R).padding_idx is None


# --- the pass -----------------------------------------------------------------------------------------------


def test_pass_record_error_matches_the_hand_formula_and_activation_aware_stays_plain(tiny_text):
    model = tiny_bert(tie_word_embeddings=False)
    weight = model.get_submodule(WORD).weight.detach().clone()
    assert not weight[0].any()  # the padding row: zero, and the rank-8 error is the tail of the spectrum
    context = Context(tokenizer=tiny_tokenizer(), data=DataSpec(source=str(tiny_text)), log=lambda _: None)
    record = apply(model, LowRankConfig(rank=R, embeddings=True, activation_aware=True, calibration_tokens=128),
                   context)
    (entry,) = record["embeddings"]
    assert entry == {**entry, "name": WORD, "shape": [V, H], "rank": R, "params_before": V * H,
                     "params_after": R * (V + H), "padding_idx": 0,
                     "method": "plain SVD (activation_aware applies to Linear layers only)"}
    assert entry["rel_error"] == pytest.approx(relative_tail(weight, R), abs=1e-6)
    assert len(record["layers"]) == 12 and "rel_output_error" in record["layers"][0]  # Linear: whitened
    assert record["params_before"] - record["params_after"] == sum(
        e["params_before"] - e["params_after"] for e in record["layers"] + record["embeddings"])


@pytest.mark.parametrize("rule", [{"ratio": 0.5}, {"energy": 0.5}], ids=["ratio", "energy"])
def test_ratio_and_energy_rules_on_the_table(rule):
    model = tiny_bert(tie_word_embeddings=False)
    power = torch.linalg.svdvals(model.get_submodule(WORD).weight.detach().double()) ** 2
    record = apply(model, LowRankConfig(targets=None, embeddings=True, **rule), quiet_ctx())
    share = power.cumsum(0) / power.sum()
    expected = 21 if "ratio" in rule else int((share < 0.5).sum()) + 1  # floor(0.5 * 128 * 64 / 192) = 21
    assert record["embeddings"][0]["rank"] == expected and record["layers"] == []


def test_tiny_bert_and_classifier_drop_exactly_the_factorised_params_and_reload_exactly(tmp_path):
    models = {"bert": tiny_bert(tie_word_embeddings=False), "classifier": tiny_bert_classifier()}
    outs = {}
    for name, model in models.items():
        before = n_params(model)
        record = apply(model, LowRankConfig(targets=None, embeddings=True, rank=R), quiet_ctx())
        assert before - n_params(model) == V * H - (V * R + R * H) == 6656
        assert [e["name"] for e in record["embeddings"]] == [WORD] and record["untied"] == []
        assert isinstance(model.get_submodule(WORD), LowRankEmbedding)
        assert isinstance(model.bert.embeddings.position_embeddings, nn.Embedding)  # not a word table
        outs[name] = save_tiny(model, tmp_path / name)
        loaded = load_checkpoint(outs[name])
        assert isinstance(loaded.get_submodule(WORD), LowRankEmbedding)
        assert same(logits(loaded), logits(model), name) and n_params(loaded) == n_params(model)
    auto = {"bert": AUTO["bert"], "classifier": "AutoModelForSequenceClassification"}
    reloaded = reload_without_llmshrink(outs, IDS, auto=auto, layer="LowRankEmbedding")
    for name, got in reloaded.items():
        (where,) = got["layers"]  # the class came from the checkpoint folder's copy of the layer file
        assert where.startswith(f"transformers_modules.{name}.") and where.endswith(".low_rank_embedding")
        assert same(got["logits"], logits(models[name]), name)


def same(got: torch.Tensor, want: torch.Tensor, name: str) -> bool:
    """Bit-exact; but the classifier's pooler is a one-row matmul whose last bit depends on where its weights
    sit in memory (a loaded checkpoint's are not 64-byte aligned), with or without this pass: 1e-6 there."""
    return torch.equal(got, want) if name != "classifier" else torch.allclose(got, want, rtol=0, atol=1e-6)


def test_embeddings_and_linear_layers_together_reload_exactly(tmp_path):
    model = tiny_bert(tie_word_embeddings=False)
    before = n_params(model)
    record = apply(model, LowRankConfig(ratio=0.4, embeddings=True, exclude=r".*attention.*"), quiet_ctx())
    assert before - n_params(model) == record["params_before"] - record["params_after"] > 0
    out = save_tiny(model, tmp_path / "both")
    assert torch.equal(logits(load_checkpoint(out)), logits(model))
    (got,) = reload_without_llmshrink({"bert": out}, IDS, auto=AUTO, layer="LowRankLinear").values()
    assert len(got["layers"]) == 4 and torch.equal(got["logits"], logits(model))


def test_tied_tables_are_refused_in_one_line_then_untied_on_request(tmp_path):
    model = tiny_llama()
    with pytest.raises(LlmshrinkError) as info:
        apply(model, LowRankConfig(rank=R, embeddings=True), quiet_ctx())
    assert str(info.value) == (
        "low_rank.embedding_targets: model.embed_tokens shares its weight with lm_head (tied embeddings); exclude "
        "it, or set tied_embeddings: untie to compress it alone (the other stays dense)"
    )
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # refused before anything changed
    with pytest.raises(LlmshrinkError, match=r"^low_rank\.embedding_targets: bert\.embeddings\.word_embeddings "
                                             r"shares its weight with cls\.predictions\.decoder \(tied embeddings\)"):
        apply(tiny_bert(), LowRankConfig(targets=None, embeddings=True, rank=R), quiet_ctx())
    head = model.lm_head.weight.detach().clone()
    before = n_params(model)
    record = apply(model, LowRankConfig(targets=None, rank=R, embeddings=True, tied_embeddings="untie"), quiet_ctx())
    assert record["untied"] == ["model.embed_tokens"] and model.config.tie_word_embeddings is False
    assert isinstance(model.model.embed_tokens, LowRankEmbedding) and torch.equal(model.lm_head.weight, head)
    assert n_params(model) - before == R * (V + H)  # the head keeps its own dense copy
    out = save_tiny(model, tmp_path / "llama")
    assert torch.equal(logits(load_checkpoint(out)), logits(model))
    (got,) = reload_without_llmshrink({"llama": out}, IDS, auto=AUTO, layer="LowRankEmbedding").values()
    assert torch.equal(got["logits"], logits(model))


def test_a_rank_that_saves_nothing_keeps_the_table():
    model = tiny_bert(tie_word_embeddings=False)
    record = apply(model, LowRankConfig(targets=None, embeddings=True, rank=H), quiet_ctx())
    assert record["embeddings"] == [] and record["params_after"] == 0
    assert record["skipped"] == [{"name": WORD, "shape": [V, H], "rank": H,
                                  "reason": "rank 64 x (128 + 64) = 12288 params >= 8192 dense"}]
    assert type(model.get_submodule(WORD)) is nn.Embedding


def test_macs_count_the_projection():
    from llmshrink.eval.macs import macs_per_token

    dense = tiny_bert(tie_word_embeddings=False)
    model = tiny_bert(tie_word_embeddings=False)
    apply(model, LowRankConfig(targets=None, embeddings=True, rank=R), quiet_ctx())
    got, base = macs_per_token(model, seq_len=8), macs_per_token(dense, seq_len=8)
    assert got["total"] - base["total"] == R * H  # one (1 x r) @ (r x H) per token; the gather is free
    assert got["uncounted_ops"] == base["uncounted_ops"]


def test_pass_errors_are_one_line():
    def error(model, **settings) -> str:
        with pytest.raises(LlmshrinkError) as info:
            apply(model, LowRankConfig(embeddings=True, **settings), quiet_ctx())
        return str(info.value)

    untied = tiny_bert(tie_word_embeddings=False)
    assert error(untied, targets=None, rank=65) == f"low_rank: {WORD}: rank 65 exceeds min(128, 64) = 64"
    assert error(untied, targets=None, rank=4, embedding_targets="nothing") == (
        "low_rank.embedding_targets: 'nothing' matches no nn.Embedding; embeddings are named like "
        f"{WORD}, bert.embeddings.position_embeddings, bert.embeddings.token_type_embeddings")
    assert error(untied, targets=None, rank=4, exclude=".*word.*") .startswith(
        "low_rank.embedding_targets: '.*word_embeddings|.*embed_tokens|.*wte' matches no nn.Embedding")
    assert error(tiny_gemma3(), targets=None, rank=4, tied_embeddings="untie") == (
        "low_rank.embedding_targets: model.embed_tokens is a Gemma3TextScaledWordEmbedding, not a plain "
        "nn.Embedding; exclude it")


RECIPE = "name: t\nmodel: {id: some/dir}\nstages:\n  - low_rank: RULE\noutput: {dir: out/t}\n"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{rank: 8, targets: null}", "stages[0].low_rank: targets: null leaves nothing to factorise; give a regex "
                                     "or set embeddings: true, got {'rank': 8, 'targets': None}"),
        ("{rank: 8, embeddings: true, embedding_targets: '('}",
         "stages[0].low_rank.embedding_targets: not a valid regex (missing ), unterminated subpattern at position 0), "
         "got '('"),
        ("{rank: 8, embeddings: maybe}", "stages[0].low_rank.embeddings: input should be a valid boolean, got 'maybe'"),
    ],
)
def test_recipe_errors_are_one_line(tmp_path, rule, message):
    path = tmp_path / "recipe.yaml"
    assert recipe_error(path, RECIPE.replace("RULE", rule)) == f"{path}: {message}"
