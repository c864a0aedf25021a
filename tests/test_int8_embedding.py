"""Int8Embedding (int8 rows, one fp32 scale per row) and quantize int8-dynamic with embeddings: true: rounding,
lookup, bytes by hand, tiny BERT encoders and a tied Llama, checkpoints with and without llmshrink, MACs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    quiet_ctx,
    relative,
    reload_without_llmshrink,
    save_tiny,
    tensor_bytes,
    tiny_bert,
    tiny_gemma3,
    tiny_llama,
)
from torch import nn
from torch.nn import functional as F

from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.macs import count_macs
from llmshrink.eval.size import count_params, has_tied_embeddings
from llmshrink.modules import COMPRESSED_MODULES, int8_dynamic
from llmshrink.modules.int8_dynamic import Int8DynamicLinear
from llmshrink.modules.int8_embedding import Int8Embedding
from llmshrink.passes.quantize import QuantizeConfig, apply
from llmshrink.quant_layers import tensor_bytes as module_bytes

pytestmark = [
    pytest.mark.skipif(not int8_dynamic.FBGEMM, reason="needs fbgemm (x86 CPU torch)"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
]

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1]])
INT8 = {"method": "int8-dynamic", "embeddings": True}


def tiny_bert_classifier(seed: int = 0):
    """tiny_bert's sizes as a BertForSequenceClassification (2 labels; nothing tied)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=128, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval()


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits


# --- the layer ----------------------------------------------------------------------------------


@torch.no_grad()
def test_rows_round_within_half_a_scale_and_the_padding_row_stays_zero():
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 24, padding_idx=3)
    embedding.weight.mul_(torch.logspace(-3, 1, 50).unsqueeze(1))  # rows four decades apart
    layer = Int8Embedding.from_embedding(embedding)
    w, q, scale = embedding.weight.double(), layer.weight_int8, layer.weight_scale
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and list(layer.parameters()) == []
    expected = (embedding.weight.abs().amax(dim=1).double() / 127).float()
    expected[3] = 1.0  # the all-zero padding row: scale 1, values 0
    assert torch.equal(scale, expected)
    assert not q[3].any() and layer.padding_idx == 3
    assert all(q[i].abs().max() == 127 for i in range(50) if i != 3)  # each row's largest value is +-127
    error = (q.double() * scale.double().unsqueeze(1) - w).abs()  # exact in float64
    assert bool((error <= scale.double().unsqueeze(1) / 2).all())
    assert float((error / scale.double().unsqueeze(1)).max()) > 0.49  # and the bound is tight
    assert torch.equal(layer.to_dense(), q.float() * scale.unsqueeze(1))
    assert layer.layout_args() == {"num_embeddings": 50, "embedding_dim": 24, "padding_idx": 3}
    assert layer.buffered_weights() == 50 * 24
    # 1 byte per value and a 4-byte scale per row: 1/4 of fp32 plus 1/dim (here 24) of it.
    assert module_bytes(layer) == 50 * 24 + 50 * 4 and module_bytes(embedding) == 50 * 24 * 4
    dense = layer.to_embedding()
    assert torch.equal(dense.weight, layer.to_dense()) and dense.padding_idx == 3
    assert Int8Embedding.from_embedding(nn.Embedding(5, 4, padding_idx=-1)).padding_idx == 4  # as nn.Embedding
    with pytest.raises(ValueError, match="max_norm"):
        Int8Embedding.from_embedding(nn.Embedding(5, 4, max_norm=1.0))


@torch.no_grad()
def test_lookup_is_the_dense_table_s_lookup_exactly_and_never_builds_the_table(monkeypatch):
    torch.manual_seed(1)
    embedding = nn.Embedding(40, 16, padding_idx=0)
    layer = Int8Embedding.from_embedding(embedding)
    ids = torch.tensor([[0, 5, 39, 5], [7, 0, 1, 2]])
    expected = F.embedding(ids, layer.to_dense())
    monkeypatch.setattr(Int8Embedding, "to_dense", lambda self: pytest.fail("forward dequantized the table"))
    out = layer(ids)
    assert out.dtype == torch.float32 and out.shape == (2, 4, 16)
    assert torch.equal(out, expected)
    assert not out[0, 0].any() and not out[1, 1].any()  # the padding row
    assert torch.equal(layer(torch.tensor(5)), expected[0, 1])  # any shape of ids
    monkeypatch.undo()
    assert relative(out, embedding(ids)) < 1e-2  # 8 bits per row: ~0.5% for Gaussian rows
    # model.to(bfloat16): bf16 output, the scales keep their exact fp32 values.
    scales = layer.weight_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scales)
    assert torch.equal(layer(ids), expected.bfloat16()) and layer.weight.dtype == torch.bfloat16
    assert COMPRESSED_MODULES["Int8Embedding"] is Int8Embedding


def test_a_lookup_counts_no_macs():
    layer = Int8Embedding.from_embedding(nn.Embedding(40, 16))
    out = count_macs(layer, torch.tensor([[1, 2, 3]]))
    assert out["total"] == 0 and out["complete"]


# --- the pass on models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (quantized model, its checkpoint, fp32 logits, the pass record, fp32 checkpoint bytes)}: a tiny
    BERT classifier (every table), tiny_bert (MLM: its tied word table excluded) and an untied tiny Llama."""
    tmp = tmp_path_factory.mktemp("int8-embedding")
    found = {}
    for name, build, extra in (
        ("classifier", tiny_bert_classifier, {}),
        ("mlm", tiny_bert, {"exclude": r".*word_embeddings"}),
        ("llama", tiny_llama, {"tied_embeddings": "untie"}),
    ):
        model = build()
        before = logits(model)
        fp32_bytes = tensor_bytes(save_tiny(copy.deepcopy(model), tmp / f"{name}-fp32"), "")
        record = apply(model, QuantizeConfig(**INT8, **extra), quiet_ctx())
        found[name] = (model, save_tiny(model, tmp / name), before, record, fp32_bytes)
    return found


def test_classifier_every_table_in_int8_bytes_by_hand_and_logits_close(saved):
    model, out, before, record, fp32_bytes = saved["classifier"]
    tables = [("bert.embeddings.word_embeddings", 128), ("bert.embeddings.position_embeddings", 64),
              ("bert.embeddings.token_type_embeddings", 2)]
    assert [(t["name"], t["shape"]) for t in record["embeddings"]] == [(n, [rows, 64]) for n, rows in tables]
    assert [(t["bytes_before"], t["bytes_after"]) for t in record["embeddings"]] == [
        (rows * 64 * 4, rows * 64 + rows * 4) for _, rows in tables]
    for name, _ in tables:
        assert isinstance(model.get_submodule(name), Int8Embedding)
    assert all(t["rel_error"] < 1e-2 and 0 < t["max_abs_error"] < 1e-3 for t in record["embeddings"])  # std 0.02
    # By hand, in the checkpoint: each block Linear (q, k, v, o 64x64; intermediate 128x64; output 64x128:
    # 32768 weights, 448 rows per block, 2 blocks) saves 3 bytes per weight less 4 per row of scales; each
    # table (128 + 64 + 2 rows of 64) the same.
    linear_saved = 2 * (3 * 32768 - 4 * 448)
    table_saved = 3 * 194 * 64 - 4 * 194
    assert (linear_saved, table_saved) == (193024, 36472)
    assert fp32_bytes - tensor_bytes(out, "") == linear_saved + table_saved
    assert record["bytes_before"] - record["bytes_after"] == linear_saved + table_saved
    assert tensor_bytes(out, "_int8") == 2 * 32768 + 194 * 64
    assert record["bytes_after"] / record["bytes_before"] == pytest.approx(record["ratio"], abs=1e-6)
    after = logits(model)
    assert 0 < relative(after, before) < 0.02  # observed 1.3% (logits near 0: an untrained head)
    assert count_params(model) == count_params(tiny_bert_classifier())  # int8 values count as weights


def test_the_tables_alone_add_little_error():
    model = tiny_bert_classifier()
    with torch.no_grad():
        before = model.bert(IDS).last_hidden_state
    record = apply(model, QuantizeConfig(**INT8, targets="classifier"), quiet_ctx())  # after the encoder
    assert len(record["layers"]) == 1 and len(record["embeddings"]) == 3
    with torch.no_grad():
        after = model.bert(IDS).last_hidden_state
    # The tables round with ~0.6% relative error (rows of N(0, 0.02), max ~ 3 sigma, step max / 127); the
    # embedding LayerNorm and the blocks pass about that on.
    assert 0 < relative(after, before) < 1e-2


def test_checkpoints_reload_exactly_with_llmshrink(saved):
    for name, (model, out, *_) in saved.items():
        loaded = load_checkpoint(out)
        tables = [n for n, m in loaded.named_modules() if isinstance(m, Int8Embedding)]
        assert tables == [n for n, m in model.named_modules() if isinstance(m, Int8Embedding)] and tables, name
        original, reloaded = model.state_dict(), loaded.state_dict()
        assert set(original) == set(reloaded)
        assert all(reloaded[k].dtype == v.dtype and torch.equal(reloaded[k], v) for k, v in original.items()), name
        if name == "classifier":
            # Same weights; the pooler's GEMV rounds its last bit differently on the (less aligned) tensor the
            # load assigns from the file: also without int8 embeddings (a checkpoint_load matter).
            assert torch.allclose(logits(loaded), logits(model), rtol=0, atol=1e-6)
        else:
            assert torch.equal(logits(loaded), logits(model)), name


def test_remote_code_reloads_without_llmshrink(saved):
    auto = {"classifier": "AutoModelForSequenceClassification", "mlm": "AutoModelForMaskedLM",
            "llama": "AutoModelForCausalLM"}
    reloaded = reload_without_llmshrink({name: out for name, (_, out, *_) in saved.items()}, IDS, auto=auto,
                                        layer="Int8Embedding")
    assert {name: len(got["layers"]) for name, got in reloaded.items()} == {"classifier": 3, "mlm": 2, "llama": 1}
    for name, got in reloaded.items():
        model = saved[name][0]
        # The layer class came from the checkpoint folder (copied by transformers), not from llmshrink.
        assert all(module.startswith(f"transformers_modules.{name}.") and module.endswith(".int8_embedding")
                   for module in got["layers"])
        assert torch.allclose(got["logits"], logits(model), rtol=0, atol=1e-6)


def test_mlm_keeps_its_tied_word_table_and_quantizes_the_others(saved):
    model, out, before, record, fp32_bytes = saved["mlm"]
    assert [t["name"] for t in record["embeddings"]] == ["bert.embeddings.position_embeddings",
                                                         "bert.embeddings.token_type_embeddings"]
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # still tied
    assert fp32_bytes - tensor_bytes(out, "") == 2 * (3 * 32768 - 4 * 448) + 3 * 66 * 64 - 4 * 66
    assert 0 < relative(logits(model), before) < 0.02


def test_tied_embeddings_are_refused_in_one_line():
    for build, name, head in ((tiny_llama, "model.embed_tokens", "lm_head"),
                              (tiny_bert, "bert.embeddings.word_embeddings", "cls.predictions.decoder")):
        model = build()
        with pytest.raises(LlmshrinkError) as info:
            apply(model, QuantizeConfig(**INT8), quiet_ctx())
        assert str(info.value) == (
            f"quantize.embedding_targets: {name} shares its weight with {head} (tied embeddings); exclude it, or "
            f"set tied_embeddings: untie to store it in int8 alone ({head} keeps a float copy)")
        # Refused before any change: the blocks are still float.
        assert not any(isinstance(m, (Int8DynamicLinear, Int8Embedding)) for m in model.modules())


def test_untied_llama_table_is_int8_and_the_head_keeps_the_float_weights(saved):
    model, out, before, record, fp32_bytes = saved["llama"]
    fresh = tiny_llama()
    assert record["untied"] == ["model.embed_tokens"] and model.config.tie_word_embeddings is False
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert torch.equal(model.lm_head.weight, fresh.lm_head.weight)
    table = record["embeddings"][0]
    # The table in int8 (8704 bytes) plus the float copy lm_head now stores alone (32768, shared before).
    assert (table["shape"], table["bytes_before"], table["bytes_after"], table["float_copy_bytes"]) == (
        [128, 64], 32768, 128 * 64 + 128 * 4 + 32768, 32768)
    # By hand: each block (q, o 64x64; k, v 32x64; gate, up 192x64; down 64x192: 49152 weights, 640 rows) saves
    # 3 bytes per weight less 4 per row; untying costs the int8 table and its scales.
    saved_bytes = 2 * (3 * 49152 - 4 * 640) - (128 * 64 + 128 * 4)
    assert fp32_bytes - tensor_bytes(out, "") == saved_bytes == record["bytes_before"] - record["bytes_after"]
    step = model.model.embed_tokens.weight_scale.max()
    assert table["max_abs_error"] <= float(step) / 2 + 1e-9
    assert has_tied_embeddings(model) is False
    assert 0 < relative(logits(model), before) < 0.03
    assert count_macs(model, IDS)["complete"]


@torch.no_grad()
def test_quantized_bert_macs_are_counted_as_before():
    model = tiny_bert_classifier()
    fp32 = count_macs(model, IDS)
    apply(model, QuantizeConfig(**INT8), quiet_ctx())
    int8 = count_macs(model, IDS)
    assert int8["complete"] and int8["total"] == fp32["total"] and int8["linear"] == fp32["linear"]


def test_other_refusals_are_one_line():
    def error(model, **cfg) -> str:
        with pytest.raises(LlmshrinkError) as info:
            apply(model, QuantizeConfig(**{**INT8, **cfg}), quiet_ctx())
        return str(info.value)

    assert error(tiny_gemma3(), tied_embeddings="untie") == (
        "quantize.embedding_targets: model.embed_tokens is a Gemma3TextScaledWordEmbedding, not a plain "
        "nn.Embedding; exclude it")
    assert error(tiny_bert_classifier(), embedding_targets="nothing") == (
        "quantize.embedding_targets: 'nothing' matches no nn.Embedding; embeddings are named like "
        "bert.embeddings.word_embeddings, bert.embeddings.position_embeddings, "
        "bert.embeddings.token_type_embeddings")
    assert error(tiny_bert_classifier(), exclude=".*embeddings.*").startswith(
        "quantize.embedding_targets: '.*embeddings.*|.*embed_tokens' matches no nn.Embedding")
    model = tiny_bert_classifier()
    apply(model, QuantizeConfig(**INT8, targets="bert.pooler.dense"), quiet_ctx())
    with pytest.raises(LlmshrinkError, match=r"^quantize.method: fp16 after int8-dynamic is not supported"):
        apply(model, QuantizeConfig(method="fp16"), quiet_ctx())


def test_a_tied_table_and_head_both_in_int8_are_untied_and_take_half_the_shared_tables_bytes():
    """What the planner's embeddings decision does (quantize lm_head too, untie): the head is an Int8DynamicLinear,
    which has no float weight; the evaluator's tie check reads it without failing."""
    model = tiny_llama()
    before = module_bytes(model.model.embed_tokens)  # the one table both used
    apply(model, QuantizeConfig(**INT8, targets="lm_head", tied_embeddings="untie"), quiet_ctx())
    assert isinstance(model.lm_head, Int8DynamicLinear) and isinstance(model.model.embed_tokens, Int8Embedding)
    assert has_tied_embeddings(model) is False
    after = module_bytes(model.model.embed_tokens) + module_bytes(model.lm_head)
    assert after == 2 * (128 * 64 + 128 * 4)  # int8 rows and an fp32 scale per row, twice
    assert after / before == pytest.approx(0.53, abs=0.01)
