"""Hidden-state and attention distillation: the losses against hand-computed values, the layer map,
and the distill pass with those terms (identical models, a deeper teacher, a wider teacher)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_tokenizer

import llmshrink.passes.distill as distill_pass
from llmshrink.context import Context
from llmshrink.distill.data import pack
from llmshrink.distill.losses import attention_kl_loss, hidden_cosine_loss, hidden_mse_loss, layer_map
from llmshrink.distill.trainer import FrozenTeacher, train
from llmshrink.errors import LlmshrinkError
from llmshrink.passes.distill import ProjectedStudent, feature_kd_loss, logit_kd_loss
from llmshrink.registry import get_pass
from llmshrink.specs import DataSpec

# p = (3/4, 1/4) against q = (1/2, 1/2), and p = (1/2, 1/2) against q = (1/4, 3/4)
KL_A = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
KL_B = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)


# --- losses -------------------------------------------------------------------------------------


def test_hidden_mse_loss_hand_value_and_mask():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [3.0, 6.0]]])
    # token 0: (1 + 4) / 2 = 2.5; token 1: (0 + 4) / 2 = 2.0
    assert hidden_mse_loss(student, teacher).item() == pytest.approx(2.25, abs=1e-6)
    assert hidden_mse_loss(student, teacher, torch.tensor([[1, 0]])).item() == pytest.approx(2.5, abs=1e-6)
    with pytest.raises(LlmshrinkError, match="need a projection"):
        hidden_mse_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_hidden_cosine_loss_hand_value_scale_and_mask():
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [4.0, 3.0]]])
    # 1 - cos: orthogonal 1, parallel 0, (3,4)·(4,3) = 24 over 5·5 -> 1/25
    expected = (1.0 + 0.0 + 1 / 25) / 3
    assert hidden_cosine_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    assert hidden_cosine_loss(student, teacher * 10).item() == pytest.approx(expected, abs=1e-6)
    assert hidden_cosine_loss(student, teacher, torch.tensor([[0, 1, 1]])).item() == pytest.approx(
        1 / 50, abs=1e-6
    )


def causal_maps():
    # (batch 1, heads 2, query 2, key 2); query 0 sees only key 0, as under a causal mask.
    teacher = torch.tensor([[[[1.0, 0.0], [0.75, 0.25]], [[1.0, 0.0], [0.5, 0.5]]]])
    student = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.25, 0.75]]]])
    return student, teacher


def test_attention_kl_loss_hand_value_mask_and_finite_gradient():
    student, teacher = causal_maps()
    # Rows of query 0 agree (KL 0); query 1 gives KL_A in head 0 and KL_B in head 1.
    assert attention_kl_loss(student, teacher).item() == pytest.approx((KL_A + KL_B) / 4, abs=1e-6)
    assert attention_kl_loss(student, teacher, torch.tensor([[0, 1]])).item() == pytest.approx(
        (KL_A + KL_B) / 2, abs=1e-6
    )
    assert attention_kl_loss(teacher, teacher.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # Zero probabilities in both maps (masked keys) must not turn the gradient into NaN.
    student = student.clone().requires_grad_(True)
    attention_kl_loss(student, teacher).backward()
    assert torch.isfinite(student.grad).all()


def test_attention_kl_loss_student_zero_is_floored_and_heads_must_match():
    teacher = torch.tensor([[[[0.5, 0.5]]]])
    student = torch.tensor([[[[1.0, 0.0]]]])
    # 1/2 ln(1/2 / 1) + 1/2 ln(1/2 / 1e-8): the student's 0 is floored at 1e-8.
    expected = 0.5 * math.log(0.5) + 0.5 * (math.log(0.5) - math.log(1e-8))
    assert attention_kl_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(LlmshrinkError, match="student attention has 2 heads, teacher 4"):
        attention_kl_loss(torch.full((1, 2, 3, 3), 1 / 3), torch.full((1, 4, 3, 3), 1 / 3))


def test_layer_map_depths():
    assert layer_map(6, 12) == [(0, 0), (1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]
    assert layer_map(2, 2) == [(0, 0), (1, 1), (2, 2)]
    # 7/3 = 2.33 -> 2, 14/3 = 4.67 -> 5
    assert layer_map(3, 7) == [(0, 0), (1, 2), (2, 5), (3, 7)]
    with pytest.raises(ValueError, match=">= 1"):
        layer_map(0, 4)


# --- loss_fn on models --------------------------------------------------------------------------


def gpt2(seed: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, sharp: bool = False):
    """A tiny GPT-2 with tiny_gpt2's vocabulary; sharp = confident logits (tied embeddings x 5)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_inner=4 * n_embd, vocab_size=128,
                        n_positions=128, bos_token_id=1, eos_token_id=1)
    model = GPT2LMHeadModel(config).eval()
    if sharp:
        with torch.no_grad():
            model.transformer.wte.weight.mul_(5.0)
    return model


def test_feature_terms_are_zero_for_a_copy_of_the_student_and_not_for_another_model():
    student = tiny_gpt2(seed=1)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    loss_fn = feature_kd_loss(0.5, 1.0, layer_map(2, 2), hidden_weight=1.0, attention_weight=1.0)
    for other, zero in ((copy.deepcopy(student), True), (tiny_gpt2(seed=2), False)):
        with distill_pass._eager_attention([student, other]):
            loss, parts = loss_fn(student, FrozenTeacher(other), ids)
        assert {"kd", "ce", "hidden", "attention", "loss"} <= parts.keys()
        for term in ("kd", "hidden", "attention"):
            assert (parts[term].item() == pytest.approx(0.0, abs=1e-6)) == zero, (term, parts)
        total = 0.5 * parts["kd"] + 0.5 * parts["ce"] + parts["hidden"] + parts["attention"]
        assert loss.item() == pytest.approx(total.item(), rel=1e-6)
    assert student.config._attn_implementation == "sdpa"  # restored


def test_zero_feature_weights_are_the_logit_loss():
    student, teacher = tiny_gpt2(seed=1), FrozenTeacher(tiny_gpt2(seed=2))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, parts = feature_kd_loss(0.7, 2.0, [], hidden_weight=0.0, attention_weight=0.0)(student, teacher, ids)
    ref, ref_parts = logit_kd_loss(0.7, 2.0)(student, teacher, ids)
    assert loss.item() == ref.item() and parts.keys() == ref_parts.keys() == {"kd", "ce", "loss"}


# --- the pass -----------------------------------------------------------------------------------


def make_ctx(tiny_text, teacher):
    return Context(tokenizer=tiny_tokenizer(), teacher=teacher,
                   data=DataSpec(source=str(tiny_text), max_tokens=48 * 32), log=lambda _: None)


def test_distill_pass_with_zero_feature_weights_trains_as_before(tiny_text):
    spec = get_pass("distill")
    cfg = spec.config_cls(steps=4, seq_len=32, lr=3e-3, warmup_steps=1, alpha=0.9, temperature=1.0,
                          hidden_weight=0.0, attention_weight=0.0)
    ctx = make_ctx(tiny_text, gpt2(2, sharp=True))
    record = spec.apply(tiny_gpt2(seed=1), cfg, ctx)
    ref = train(tiny_gpt2(seed=1), pack(ctx.train_token_ids(), 32), logit_kd_loss(0.9, 1.0), steps=4, lr=3e-3,
                warmup_steps=1, batch_size=4, seed=ctx.seed, device="cpu", log=lambda _: None,
                teacher=gpt2(2, sharp=True))
    assert (record["first_loss"], record["last_loss"]) == (ref.first_loss, ref.last_loss)
    assert record["final_parts"].keys() == {"kd", "ce", "loss"} and "layer_map" not in record


def test_distill_pass_hidden_and_attention_terms_with_a_deeper_teacher(tiny_text):
    spec = get_pass("distill")
    cfg = spec.config_cls(steps=3, seq_len=32, lr=3e-3, warmup_steps=0, alpha=0.5, temperature=1.0,
                          hidden_weight=2.0, hidden_loss="cosine", attention_weight=0.5)
    student, teacher = tiny_gpt2(seed=1), gpt2(2, n_layer=4, sharp=True)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    record = spec.apply(student, cfg, make_ctx(tiny_text, teacher))
    json.dumps(record)
    parts = record["final_parts"]
    assert record["layer_map"] == [[0, 0], [1, 2], [2, 4]] and record["projection_params"] == 0
    assert parts["hidden"] > 0 and parts["attention"] > 0
    total = 0.5 * parts["kd"] + 0.5 * parts["ce"] + 2.0 * parts["hidden"] + 0.5 * parts["attention"]
    assert parts["loss"] == pytest.approx(total, rel=1e-5)
    assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert not isinstance(student, ProjectedStudent) and not student.training


def test_distill_pass_projects_a_narrower_student_and_trains_the_projections(tiny_text, monkeypatch):
    spec = get_pass("distill")
    cfg = spec.config_cls(steps=20, seq_len=32, lr=3e-3, warmup_steps=2, alpha=0.5, temperature=1.0,
                          hidden_weight=1.0, hidden_loss="cosine")
    seen: dict = {}
    real_train = distill_pass.train

    def spy(student, blocks, loss_fn, **kwargs):
        # The hidden term on fixed blocks, through the projections, before and after training.
        def hidden() -> float:
            with torch.no_grad():
                return loss_fn(student, FrozenTeacher(kwargs["teacher"]), blocks[:8])[1]["hidden"].item()

        seen["student"] = student
        seen["weights"] = [p.detach().clone() for p in student.projections.parameters()]
        seen["before"] = hidden()
        result = real_train(student, blocks, loss_fn, **kwargs)
        seen["after"] = hidden()
        return result

    monkeypatch.setattr(distill_pass, "train", spy)
    model = gpt2(1, n_embd=32)
    record = spec.apply(model, cfg, make_ctx(tiny_text, gpt2(2, sharp=True)))
    wrapped = seen["student"]
    assert isinstance(wrapped, ProjectedStudent) and wrapped.student is model
    assert record["projection_params"] == 3 * 32 * 64  # one 32 -> 64 projection per mapped pair
    assert record["trained_params"] == sum(p.numel() for p in model.parameters())
    assert all(not torch.equal(w, p) for w, p in zip(seen["weights"], wrapped.projections.parameters(), strict=True))
    assert seen["after"] < 0.8 * seen["before"], seen
    assert record["last_loss"] < record["first_loss"]


def test_distill_pass_feature_errors(tiny_text):
    spec = get_pass("distill")
    ctx = make_ctx(tiny_text, gpt2(2))
    with pytest.raises(LlmshrinkError, match=r"layer_map: pair \(3, 1\) out of range: the student has "
                                             r"hidden states 0..2, the teacher 0..2"):
        spec.apply(tiny_gpt2(seed=1), spec.config_cls(steps=1, seq_len=32, hidden_weight=1.0,
                                                       layer_map=[(0, 0), (3, 1)]), ctx)
    with pytest.raises(LlmshrinkError, match="hidden_weight or attention_weight > 0 needs a teacher"):
        spec.apply(tiny_gpt2(seed=1), spec.config_cls(steps=1, seq_len=32, alpha=0.0, hidden_weight=1.0),
                   make_ctx(tiny_text, None))
    with pytest.raises(LlmshrinkError, match="student attention has 2 heads, teacher 4"):
        spec.apply(gpt2(1, n_head=2), spec.config_cls(steps=1, seq_len=32, attention_weight=1.0), ctx)
    with pytest.raises(ValueError, match="hidden_loss"):
        spec.config_cls(steps=1, hidden_loss="l1")
