"""Distillation losses beyond the forward-KL logit term: the KD divergences (reverse KL, JSD, skew
KL / reverse KL) and the hidden-state and attention losses against hand-computed values, the layer
map, and the distill pass with those terms (each divergence, identical models, a deeper teacher, a
wider teacher)."""

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
from llmshrink.distill.losses import (
    DIVERGENCES,
    attention_kl_loss,
    distill_loss,
    forward_kl,
    hidden_cosine_loss,
    hidden_mse_loss,
    jsd,
    kd_divergence,
    kd_kl_loss,
    layer_map,
    reverse_kl,
    skew_kl,
    skew_rkl,
)
from llmshrink.distill.trainer import FrozenTeacher, train
from llmshrink.distill.training_modes import eager_attention
from llmshrink.errors import LlmshrinkError
from llmshrink.passes.distill import ProjectedStudent, feature_kd_loss, logit_kd_loss
from llmshrink.registry import get_pass
from llmshrink.specs import DataSpec

# p = (3/4, 1/4) against q = (1/2, 1/2), and p = (1/2, 1/2) against q = (1/4, 3/4)
KL_A = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
KL_B = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)


# --- losses -------------------------------------------------------------------------------------


# Two counted tokens over a 3-word vocabulary, p = teacher, q = student, and a third, masked token.
P = [[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]
Q = [[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]
T = 2.0


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))


def mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]


def by_hand(per_token):
    """T² times the mean over the two counted tokens of per_token(p, q), in plain floats."""
    return T**2 * sum(per_token(p, q) for p, q in zip(P, Q, strict=True)) / len(P)


def tiny_logits(masked_row=(0.0, 0.0, 0.0)):
    """Logits whose softmax at T is P / Q (T·log prob, shifted by a constant), plus a masked third token."""
    teacher = [[T * math.log(x) + 1.0 for x in row] for row in P] + [list(masked_row)]
    student = [[T * math.log(x) - 3.0 for x in row] for row in Q] + [[5.0, -5.0, 0.0]]
    return torch.tensor([student]), torch.tensor([teacher]), torch.tensor([[1, 1, 0]])


def call(name, student, teacher, temperature, mask=None, weight=None):
    fn = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl, "skew_rkl": skew_rkl}
    kwargs = {} if weight is None else {"beta" if name == "jsd" else "skew": weight}
    return fn[name](student, teacher, temperature, mask, **kwargs)


# Non-default, unequal weights, so a swapped p / q or w / 1-w shows.
@pytest.mark.parametrize("name, weight, per_token", [
    ("forward_kl", None, lambda p, q: kl(p, q)),
    ("reverse_kl", None, lambda p, q: kl(q, p)),
    ("jsd", 0.3, lambda p, q: 0.3 * kl(p, mix(p, q, 0.3)) + 0.7 * kl(q, mix(p, q, 0.3))),
    ("jsd", None, lambda p, q: 0.5 * kl(p, mix(p, q, 0.5)) + 0.5 * kl(q, mix(p, q, 0.5))),
    ("skew_kl", 0.25, lambda p, q: kl(p, mix(p, q, 0.25))),
    ("skew_kl", None, lambda p, q: kl(p, mix(p, q, 0.1))),
    ("skew_rkl", 0.25, lambda p, q: kl(q, mix(p, q, 0.75))),
    ("skew_rkl", None, lambda p, q: kl(q, mix(p, q, 0.9))),
])
def test_divergence_hand_value_at_temperature_with_a_masked_token(name, weight, per_token):
    student, teacher, mask = tiny_logits()
    expected = by_hand(per_token)
    assert call(name, student, teacher, T, mask, weight).item() == pytest.approx(expected, rel=1e-5)
    # The masked token's logits change nothing, and get no gradient.
    student, teacher, mask = tiny_logits(masked_row=(40.0, -7.0, 3.0))
    student.requires_grad_(True)
    value = call(name, student, teacher, T, mask, weight)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert torch.all(student.grad[0, 2] == 0) and torch.any(student.grad[0, :2] != 0)
    # kd_divergence picks the same function and weight by name.
    extra = {} if weight is None else {"jsd_beta" if name == "jsd" else "skew": weight}
    assert kd_divergence(name, student, teacher, T, mask, **extra).item() == value.item()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_is_zero_for_identical_logits(name):
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0)) * 3
    assert kd_divergence(name, logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_divergence(name, logits, logits.flip(-1), 2.0).item() > 0.01


def test_forward_kl_is_todays_kd_term():
    s, t = torch.randn(2, 2, 6, 13, generator=torch.Generator().manual_seed(1)).unbind(0)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1]])
    # The formula kd_kl_loss had before the other divergences existed, verbatim.
    log_q, log_p = torch.log_softmax(s / 2.0, -1), torch.log_softmax(t / 2.0, -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    before = (per_token * mask).sum() / mask.sum() * 4.0
    assert forward_kl is kd_kl_loss and torch.equal(forward_kl(s, t, 2.0, mask), before)
    ids = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(2))
    default, _ = distill_loss(s, t, ids, 0.7, 2.0)
    named, _ = distill_loss(s, t, ids, 0.7, 2.0, loss="forward_kl", skew=0.5, jsd_beta=0.2)
    assert torch.equal(default, named)


def test_divergence_relations():
    s, t = torch.randn(2, 3, 4, 7, generator=torch.Generator().manual_seed(3)).unbind(0)
    approx = lambda x: pytest.approx(x.item(), rel=1e-5)  # noqa: E731
    assert reverse_kl(s, t, 2.0).item() == approx(forward_kl(t, s, 2.0))
    assert jsd(s, t, 2.0).item() == approx(jsd(t, s, 2.0))  # symmetric at beta = 1/2
    assert jsd(s, t, 2.0, beta=0.2).item() == approx(jsd(t, s, 2.0, beta=0.8))
    # Small beta: JSD / beta -> forward KL; small skew: skew KL -> KL, skew reverse KL -> reverse KL.
    assert jsd(s, t, 1.0, beta=1e-3).item() / 1e-3 == pytest.approx(forward_kl(s, t, 1.0).item(), rel=1e-2)
    assert skew_kl(s, t, 1.0, skew=1e-6).item() == pytest.approx(forward_kl(s, t, 1.0).item(), rel=1e-4)
    assert skew_rkl(s, t, 1.0, skew=1e-6).item() == pytest.approx(reverse_kl(s, t, 1.0).item(), rel=1e-4)
    # Mixing in more of p (skew up) shrinks skew KL monotonically towards 0.
    values = [skew_kl(s, t, 1.0, skew=a).item() for a in (0.05, 0.1, 0.5, 0.9, 1 - 1e-6)]
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(0.0, abs=1e-5)


def test_divergences_stay_finite_and_bounded_for_opposite_one_hot_predictions():
    # p puts all mass on word 0, q on word 1 (tails e^-60): KL is ~60, the mixtures hit their bounds.
    teacher = torch.tensor([[[30.0, -30.0, -30.0]]])
    student = torch.tensor([[[-30.0, 30.0, -30.0]]], requires_grad=True)
    entropy = lambda b: -b * math.log(b) - (1 - b) * math.log(1 - b)  # noqa: E731
    for value, bound in ((skew_kl(student, teacher, skew=0.1), -math.log(0.1)),
                         (skew_rkl(student, teacher, skew=0.2), -math.log(0.2)),
                         (jsd(student, teacher, beta=0.3), entropy(0.3))):
        assert value.item() == pytest.approx(bound, rel=1e-4)
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(grad).all()
    assert forward_kl(student, teacher).item() == pytest.approx(60.0, rel=1e-3)


def test_divergence_argument_errors():
    s = t = torch.zeros(1, 2, 3)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"skew must be in \(0, 1\)"):
            skew_kl(s, t, skew=bad)
        with pytest.raises(ValueError, match=r"jsd beta must be in \(0, 1\)"):
            jsd(s, t, beta=bad)
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'"):
        kd_divergence("kl", s, t)
    with pytest.raises(LlmshrinkError, match="share the student's tokenizer"):
        reverse_kl(s, torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="temperature"):
        skew_rkl(s, t, 0.0)


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
    """tiny_gpt2 of another size; sharp = confident logits (tied embeddings x 5)."""
    model = tiny_gpt2(seed, layers=n_layer, n_embd=n_embd, n_head=n_head, n_inner=4 * n_embd)
    if sharp:
        with torch.no_grad():
            model.transformer.wte.weight.mul_(5.0)
    return model


def test_feature_terms_are_zero_for_a_copy_of_the_student_and_not_for_another_model():
    student = tiny_gpt2(seed=1)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    loss_fn = feature_kd_loss(0.5, 1.0, layer_map(2, 2), hidden_weight=1.0, attention_weight=1.0)
    for other, zero in ((copy.deepcopy(student), True), (tiny_gpt2(seed=2), False)):
        with eager_attention([student, other], "distill"):
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


def test_feature_loss_uses_the_chosen_divergence():
    student, teacher = tiny_gpt2(seed=1), FrozenTeacher(tiny_gpt2(seed=2))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    _, parts = feature_kd_loss(1.0, 2.0, layer_map(2, 2), hidden_weight=1.0, loss="jsd", jsd_beta=0.3)(
        student, teacher, ids)
    with torch.no_grad():
        _, ref = distill_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, ids, 1.0, 2.0,
                              loss="jsd", jsd_beta=0.3)
    assert parts["kd"].item() == pytest.approx(ref["kd"].item(), rel=1e-6)


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


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_distill_pass_lowers_each_divergence(tiny_text, loss):
    spec = get_pass("distill")
    cfg = spec.config_cls(steps=12, seq_len=32, lr=3e-3, warmup_steps=1, alpha=1.0, temperature=2.0, loss=loss)
    record = spec.apply(tiny_gpt2(seed=1), cfg, make_ctx(tiny_text, gpt2(2, sharp=True)))
    assert record["loss"] == loss and ("skew" in record) == loss.startswith("skew") and ("jsd_beta" in record) == (
        loss == "jsd")
    assert record["last_loss"] < 0.8 * record["first_loss"], record["curve"]  # each falls ~30% here


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
