"""Distillation: losses against hand-computed values, data loading, the training loop and the pass."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import WORDS, tiny_gpt2, tiny_tokenizer

from llmshrink.context import Context
from llmshrink.distill.data import load_texts, pack, token_ids
from llmshrink.distill.losses import ce_loss, distill_loss, kd_kl_loss
from llmshrink.distill.trainer import train
from llmshrink.errors import LlmshrinkError
from llmshrink.passes.distill import logit_kd_loss
from llmshrink.registry import get_pass
from llmshrink.specs import DataSpec

LN3 = math.log(3.0)
# p = (3/4, 1/4) against q = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
KL_P_Q = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


# --- losses -------------------------------------------------------------------------------------


def test_kd_kl_loss_hand_value_and_temperature_scaling():
    student = torch.tensor([[[0.0, 0.0]]])
    teacher = torch.tensor([[[LN3, 0.0]]])
    assert kd_kl_loss(student, teacher, 1.0).item() == pytest.approx(KL_P_Q, abs=1e-6)
    # At T=2 logits 2·ln3 give the same p, and the loss is scaled by T² = 4.
    assert kd_kl_loss(student, teacher * 2, 2.0).item() == pytest.approx(4 * KL_P_Q, abs=1e-6)


def test_kd_kl_loss_is_zero_for_identical_logits_and_respects_mask():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    assert kd_kl_loss(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # Position 1 disagrees wildly but is masked out; position 0 gives KL_P_Q.
    student = torch.tensor([[[0.0, 0.0], [10.0, -10.0]]])
    teacher = torch.tensor([[[LN3, 0.0], [-10.0, 10.0]]])
    mask = torch.tensor([[1, 0]])
    assert kd_kl_loss(student, teacher, 1.0, mask).item() == pytest.approx(KL_P_Q, abs=1e-6)
    with pytest.raises(LlmshrinkError, match="share the student's tokenizer"):
        kd_kl_loss(torch.zeros(1, 1, 3), torch.zeros(1, 1, 4))


def test_ce_loss_is_shifted_next_token_cross_entropy():
    # Position 0 predicts labels[1] = 1 with p = 3/4; position 1 predicts labels[2] = 0 with p = 1/2.
    # Position 2 has no label: its huge wrong logit must not count.
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0], [-50.0, 50.0]]])
    labels = torch.tensor([[1, 1, 0]])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert ce_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    # Masking out label 2 leaves only position 0's prediction.
    assert ce_loss(logits, labels, torch.tensor([[1, 1, 0]])).item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_distill_loss_mixes_kd_and_ce_and_skips_last_position():
    student = torch.tensor([[[0.0, LN3], [0.0, 0.0], [0.0, 0.0]]])
    # The teacher agrees at position 0, gives p = (3/4, 1/4) at 1, and disagrees at the unused last one.
    teacher = torch.tensor([[[0.0, LN3], [LN3, 0.0], [50.0, -50.0]]])
    ids = torch.tensor([[1, 1, 0]])
    kd = KL_P_Q / 2  # mean over positions 0 and 1
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    loss, parts = distill_loss(student, teacher, ids, alpha=0.25, temperature=1.0)
    assert loss.item() == pytest.approx(0.25 * kd + 0.75 * ce, abs=1e-6)
    assert parts["kd"].item() == pytest.approx(kd, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, abs=1e-6)
    ce_only, parts = distill_loss(student, None, ids, alpha=0.0)
    assert ce_only.item() == pytest.approx(ce, abs=1e-6) and "kd" not in parts
    with pytest.raises(LlmshrinkError, match="needs a teacher"):
        distill_loss(student, None, ids, alpha=0.5)


# --- data ---------------------------------------------------------------------------------------


def write_docs(tmp_path, n=40):
    path = tmp_path / "docs.txt"
    # Each document differs (a different vocabulary word), so different subsets give different ids.
    path.write_text("\n\n".join(f"the {WORDS[10 + i]} of and\nto in is" for i in range(n)) + "\n")
    return path


def test_token_ids_fraction_is_seeded_and_max_tokens_is_a_prefix(tmp_path):
    tok = tiny_tokenizer()
    src = str(write_docs(tmp_path))
    full = token_ids(DataSpec(source=src), tok)
    docs = load_texts(DataSpec(source=src))
    assert len(docs) == 40
    # Source order, documents joined by eos, no other special tokens.
    expected = []
    for doc in docs:
        expected += ([tok.eos_token_id] if expected else []) + tok(doc, add_special_tokens=False)["input_ids"]
    assert full.tolist() == expected
    half = token_ids(DataSpec(source=src, fraction=0.5, seed=3), tok)
    assert torch.equal(half, token_ids(DataSpec(source=src, fraction=0.5, seed=3), tok))
    assert not torch.equal(half, token_ids(DataSpec(source=src, fraction=0.5, seed=4), tok))
    assert (half == tok.eos_token_id).sum().item() == 20 - 1
    capped = token_ids(DataSpec(source=src, max_tokens=50), tok)
    assert capped.dtype == torch.long and torch.equal(capped, full[:50])


def test_pack_shapes_and_too_little_text():
    blocks = pack(torch.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(LlmshrinkError, match="3 tokens .* seq_len=4"):
        pack(torch.arange(3), 4)


def test_load_texts_jsonl_parquet_and_builtin(tmp_path, monkeypatch):
    import datasets

    rows = [{"content": "first doc", "n": 1}, {"content": "second doc", "n": 2}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_texts(DataSpec(source=str(jsonl), text_field="content")) == ["first doc", "second doc"]
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    assert load_texts(DataSpec(source=str(parquet), text_field="content")) == ["first doc", "second doc"]

    calls = []

    def fake_builtin(name, split):
        calls.append((name, split))
        return "para one\nline two\n\n\npara two\n"

    monkeypatch.setattr("llmshrink.corpus.builtin_text", fake_builtin)
    assert load_texts(DataSpec(source="builtin:shakespeare", split="test")) == ["para one\nline two", "para two"]
    assert calls == [("shakespeare", "test")]


def test_load_texts_errors_are_one_line(tmp_path, monkeypatch):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(LlmshrinkError, match=f"file not found: {missing}"):
        load_texts(DataSpec(source=str(missing)))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"content": "x", "id": 1}) + "\n")
    with pytest.raises(LlmshrinkError) as err:
        load_texts(DataSpec(source=str(jsonl)))
    assert str(err.value) == f"data.text_field: {jsonl} has no field 'text'; fields: content, id"

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(LlmshrinkError) as err:
        load_texts(DataSpec(source="wikitext", config="wikitext-2-raw-v1"))
    assert str(err.value) == (
        "data.source: cannot load dataset 'wikitext' (offline?): "
        "use a local .txt/.jsonl file or builtin:shakespeare"
    )


# --- training loop ------------------------------------------------------------------------------


def sharp_teacher():
    """A tiny GPT-2 with confident predictions (a random init is near uniform, so KD would start ~0)."""
    teacher = tiny_gpt2(seed=2)
    with torch.no_grad():
        teacher.transformer.wte.weight.mul_(5.0)  # tied with lm_head: sharper logits
    return teacher


def text_blocks(path, seq_len=32):
    return pack(token_ids(DataSpec(source=str(path)), tiny_tokenizer()), seq_len)


def test_train_lowers_kd_loss_and_leaves_teacher_alone(tiny_text):
    blocks = text_blocks(tiny_text)
    blocks = blocks[: len(blocks) // 4 * 4]  # whole micro-batches only, so tokens are exact
    teacher = sharp_teacher()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    kwargs = dict(steps=30, lr=3e-3, warmup_steps=3, batch_size=4, seed=0, device="cpu", log=lambda _: None)
    student = tiny_gpt2(seed=1)
    result = train(student, blocks, logit_kd_loss(1.0, 1.0), teacher=teacher, **kwargs)
    assert result.steps == 30 and len(result.losses) == 30
    assert result.last_loss < 0.5 * result.first_loss, result.losses
    assert result.tokens == 30 * 4 * 32 and result.tokens_per_s > 0
    assert not student.training and not teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    # Same seed, same data, same start: the same loss curve.
    again = train(tiny_gpt2(seed=1), blocks, logit_kd_loss(1.0, 1.0), teacher=teacher, **kwargs)
    assert again.losses == pytest.approx(result.losses, rel=1e-5)


def test_train_counts_optimizer_steps_with_grad_accum_across_epochs(tiny_text):
    blocks = text_blocks(tiny_text)[:6]  # 3 micro-batches of 2 per epoch; 7 steps x 2 cycles epochs
    student = tiny_gpt2(seed=1)
    before = student.transformer.wte.weight.detach().clone()
    result = train(student, blocks, logit_kd_loss(0.0, 1.0), steps=7, batch_size=2, grad_accum=2,
                   warmup_steps=0, device="cpu", log=lambda _: None)
    assert result.steps == 7 and result.tokens == 7 * 2 * 2 * 32
    assert not torch.equal(before, student.transformer.wte.weight)


# --- the pass -----------------------------------------------------------------------------------


def make_ctx(tiny_text, teacher=True, logs=None):
    return Context(
        tokenizer=tiny_tokenizer(),
        teacher=sharp_teacher() if teacher else None,
        data=DataSpec(source=str(tiny_text), max_tokens=48 * 32),  # 12 whole batches of 4 x 32
        log=(logs if logs is not None else []).append,
    )


def test_distill_pass_record_and_loss_drop(tiny_text):
    spec = get_pass("distill")
    cfg = spec.config_cls(steps=30, seq_len=32, batch_size=4, lr=3e-3, warmup_steps=3, alpha=0.9,
                          temperature=1.0)
    model, logs = tiny_gpt2(seed=1), []
    record = spec.apply(model, cfg, make_ctx(tiny_text, logs=logs))
    expected = {"steps", "tokens", "seconds", "tokens_per_s", "first_loss", "last_loss", "lr", "alpha",
                "temperature", "trained_params"}
    assert expected <= record.keys()
    json.dumps(record)
    assert record["steps"] == 30 and record["tokens"] == 30 * 4 * 32
    assert record["last_loss"] < 0.6 * record["first_loss"]
    assert record["trained_params"] == sum(p.numel() for p in model.parameters())
    assert not model.training and any("distill:" in line for line in logs)


def test_distill_pass_trains_only_compressed_layers(tiny_text):
    from llmshrink.modules import KroneckerLinear

    model = tiny_gpt2(seed=1)
    mlp = model.transformer.h[0].mlp
    mlp.c_fc = KroneckerLinear.from_linear(mlp.c_fc, (16, 8), (16, 8))  # 64 -> 256
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if "h.0.mlp.c_fc." not in n}
    compressed = {n: p.detach().clone() for n, p in model.named_parameters() if "h.0.mlp.c_fc." in n}
    cfg = get_pass("distill").config_cls(steps=3, seq_len=32, lr=1e-2, warmup_steps=0, train="compressed")
    record = get_pass("distill").apply(model, cfg, make_ctx(tiny_text))
    params = dict(model.named_parameters())
    assert record["trained_params"] == sum(p.numel() for p in compressed.values())
    assert all(torch.equal(v, params[n]) for n, v in dense.items())
    assert all(not torch.equal(v, params[n]) for n, v in compressed.items())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_distill_pass_errors(tiny_text):
    spec = get_pass("distill")
    with pytest.raises(LlmshrinkError, match="alpha > 0 needs a teacher"):
        spec.apply(tiny_gpt2(), spec.config_cls(steps=1, seq_len=32), make_ctx(tiny_text, teacher=False))
    with pytest.raises(LlmshrinkError, match="no trainable compressed layers"):
        spec.apply(tiny_gpt2(), spec.config_cls(steps=1, seq_len=32, train="compressed"), make_ctx(tiny_text))
    with pytest.raises(ValueError, match="extra"):
        spec.config_cls(steps=1, sequence_length=32)
    with pytest.raises(ValueError, match="alpha"):
        spec.config_cls(steps=1, alpha=1.5)


def test_distill_pass_loads_another_teacher_by_id(tiny_text, tiny_model_dir):
    spec = get_pass("distill")
    cfg = spec.config_cls(steps=2, seq_len=32, warmup_steps=0, teacher=str(tiny_model_dir))
    record = spec.apply(tiny_gpt2(seed=1), cfg, make_ctx(tiny_text, teacher=False))
    assert record["teacher"] == str(tiny_model_dir) and record["steps"] == 2
