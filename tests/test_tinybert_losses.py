"""TinyBERT losses against hand-computed values on (batch 2, seq 3) inputs with padding, the padding
ignored (values and gradients), temperature scaling, projections and the uniform layer map."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmshrink.distill.tinybert_losses import (
    HiddenProjection,
    attention_loss,
    embedding_loss,
    hidden_loss,
    prediction_loss,
    uniform_layer_map,
)

# Batch 2, seq 3: sequence 0 has two real tokens, sequence 1 one.
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def hidden_pair(padding: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Width-2 states whose real tokens differ by (1, 1), (2, 0) and (0, 3): squared error means 1, 2, 4.5."""
    teacher = torch.tensor([[[0.5, -1.0], [3.0, 2.0], [0.0, 0.0]],
                            [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    student = teacher + torch.tensor([[[1.0, 1.0], [2.0, 0.0], [padding, -padding]],
                                      [[0.0, 3.0], [padding, 7.0], [-padding, padding]]])
    return student, teacher


@pytest.mark.parametrize("loss", [hidden_loss, embedding_loss])
def test_hidden_and_embedding_mse_by_hand_with_padding(loss):
    student, teacher = hidden_pair()
    assert loss(student, teacher, MASK).item() == pytest.approx((1 + 2 + 4.5) / 3)
    # Whatever the padded positions hold changes nothing, and they get no gradient.
    student, teacher = hidden_pair(padding=1e3)
    student.requires_grad_(True)
    value = loss(student, teacher, MASK)
    assert value.item() == pytest.approx(2.5)
    value.backward()
    assert torch.all(student.grad[MASK == 0] == 0)
    # d/ds of Σ (s - t)² / (2 wide · 3 tokens) = (s - t) / 3 on the real tokens.
    assert torch.allclose(student.grad[MASK == 1], torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]]) / 3)
    # Without a mask every position counts.
    assert loss(*hidden_pair(), None).item() > 2.5


def test_projection_maps_the_student_width_to_the_teacher_width():
    # W: (a, b) -> (a, b, a + b), no bias. Student token (1, 2) -> (1, 2, 3); teacher (1, 0, 3): errors (0, 4, 0).
    projection = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    student = torch.tensor([[[1.0, 2.0], [50.0, -50.0]]])
    teacher = torch.tensor([[[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])
    value = embedding_loss(student, teacher, mask, projection)
    assert value.item() == pytest.approx(4 / 3)
    assert hidden_loss(student, teacher, mask, projection).item() == pytest.approx(4 / 3)
    value.backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


def test_width_and_shape_errors():
    student, teacher = torch.zeros(2, 3, 4), torch.zeros(2, 3, 6)
    with pytest.raises(ValueError, match=r"hidden_loss: student width 4 differs from teacher width 6; pass a projection"):
        hidden_loss(student, teacher, MASK)
    with pytest.raises(ValueError, match=r"embedding_loss: projected student \(2, 3, 5\) and teacher \(2, 3, 6\)"):
        embedding_loss(student, teacher, MASK, nn.Linear(4, 5))
    with pytest.raises(ValueError, match=r"hidden_loss: mask \(2, 2\) does not match the inputs' \(2, 3\)"):
        hidden_loss(teacher, teacher, MASK[:, :2])
    with pytest.raises(ValueError, match=r"hidden_loss: expected \(batch, seq, width\)"):
        hidden_loss(torch.zeros(3, 4), torch.zeros(3, 4))


def attention_pair(padding: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 2 heads, 3, 3) maps; token 2 is padding. On the real 2×2 block the student differs from the
    teacher by [[1, 0], [0, 1]] in head 0 and [[2, 0], [0, 0]] in head 1: squared errors 2 + 4 over
    2 heads × 4 pairs = 0.75. The padded row and column hold `padding` in the student, -inf in the teacher."""
    teacher = torch.arange(18, dtype=torch.float32).reshape(1, 2, 3, 3) / 10
    delta = torch.zeros(1, 2, 3, 3)
    delta[0, 0, 0, 0] = delta[0, 0, 1, 1] = 1.0
    delta[0, 1, 0, 0] = 2.0
    student = teacher + delta
    student[..., 2, :] = student[..., :, 2] = padding
    teacher[..., 2, :] = teacher[..., :, 2] = float("-inf")
    return student, teacher


def test_attention_loss_by_hand_ignores_padded_queries_and_keys():
    mask = torch.tensor([[1, 1, 0]])
    student, teacher = attention_pair(padding=-1e4)
    assert attention_loss(student, teacher, mask).item() == pytest.approx(0.75)
    student, teacher = attention_pair(padding=123.0)
    student.requires_grad_(True)
    value = attention_loss(student, teacher, mask)
    assert value.item() == pytest.approx(0.75)  # no NaN from the -inf either
    value.backward()
    assert torch.all(student.grad[..., 2, :] == 0) and torch.all(student.grad[..., :, 2] == 0)
    assert torch.isfinite(student.grad).all() and student.grad[0, 0, 0, 0] != 0


def test_attention_loss_accepts_probabilities_and_averages_over_the_batch():
    scores = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    probs = scores.masked_fill(MASK[:, None, None, :] == 0, float("-inf")).softmax(-1)
    assert attention_loss(probs, probs.clone(), MASK).item() == 0.0
    other = probs.flip(1)
    # Sequence 0 has 4 real pairs, sequence 1 one: a pooled mean over the 5, not a mean of two means.
    per_pair = (probs - other).pow(2).mean(1)
    expected = (per_pair[0, :2, :2].sum() + per_pair[1, 0, 0]) / 5
    assert attention_loss(probs, other, MASK).item() == pytest.approx(expected.item())
    assert attention_loss(probs, other).item() == pytest.approx((probs - other).pow(2).mean().item())


def test_attention_loss_errors():
    with pytest.raises(ValueError, match="attention_loss: student has 4 heads, teacher 12; .* must be equal"):
        attention_loss(torch.zeros(2, 4, 3, 3), torch.zeros(2, 12, 3, 3), MASK)
    with pytest.raises(ValueError, match=r"attention_loss: expected \(batch, heads, query, key\)"):
        attention_loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="differ or are not square"):
        attention_loss(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 2, 2))


# Teacher p and student q per example; logits t·log(prob) + constant give exactly these at temperature t.
P = [[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]
Q = [[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]


def logits_for(probs, temperature, shift):
    return torch.tensor([[temperature * math.log(x) + shift for x in row] for row in probs])


def soft_ce(p, q):
    return -sum(a * math.log(b) for a, b in zip(p, q, strict=True))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_prediction_loss_by_hand_at_temperature(temperature):
    student, teacher = logits_for(Q, temperature, -3.0), logits_for(P, temperature, 1.0)
    expected = (soft_ce(P[0], Q[0]) + soft_ce(P[1], Q[1])) / 2  # no t² factor
    assert prediction_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_prediction_loss_temperature_scales_the_logits():
    s, t = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1)).unbind(0)
    assert prediction_loss(s * 3, t * 3, 3.0).item() == pytest.approx(prediction_loss(s, t, 1.0).item(), rel=1e-6)
    assert prediction_loss(s, t, 4.0).item() != pytest.approx(prediction_loss(s, t, 1.0).item(), rel=1e-3)
    # Matching the teacher leaves its entropy, not 0.
    entropy = -(t.softmax(-1) * t.log_softmax(-1)).sum(-1).mean()
    assert prediction_loss(t, t, 1.0).item() == pytest.approx(entropy.item(), rel=1e-6)


def test_token_level_prediction_loss_ignores_padded_tokens():
    # (batch 1, seq 3, classes 3): tokens 0 and 1 are P / Q, token 2 is padding.
    student = torch.cat([logits_for(Q, 2.0, 0.0), torch.tensor([[9.0, -9.0, 0.0]])])[None]
    teacher = torch.cat([logits_for(P, 2.0, 0.0), torch.tensor([[-5.0, 5.0, 1.0]])])[None]
    mask = torch.tensor([[1, 1, 0]])
    expected = (soft_ce(P[0], Q[0]) + soft_ce(P[1], Q[1])) / 2
    student.requires_grad_(True)
    value = prediction_loss(student, teacher, 2.0, mask)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert torch.all(student.grad[0, 2] == 0) and torch.any(student.grad[0, :2] != 0)


def test_prediction_loss_errors():
    with pytest.raises(ValueError, match=r"prediction_loss: student logits \(2, 3\) and teacher logits \(2, 4\)"):
        prediction_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        prediction_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match=r"mask \(2, 3\) does not match the inputs' \(2,\)"):
        prediction_loss(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, MASK)


@pytest.mark.parametrize("student, teacher, expected", [
    (4, 12, [3, 6, 9, 12]),  # TinyBERT-4 from BERT-base: k = 3
    (6, 12, [2, 4, 6, 8, 10, 12]),
    (6, 6, [1, 2, 3, 4, 5, 6]),  # identity
    (1, 12, [12]),
    (4, 6, [2, 3, 5, 6]),  # m · 1.5 rounded half up
    (3, 8, [3, 5, 8]),
])
def test_uniform_layer_map(student, teacher, expected):
    assert uniform_layer_map(student, teacher) == expected


def test_uniform_layer_map_errors():
    with pytest.raises(ValueError, match=r"more layers \(6\) than the teacher \(4\)"):
        uniform_layer_map(6, 4)
    with pytest.raises(ValueError, match="layer counts must be >= 1"):
        uniform_layer_map(0, 12)


def test_hidden_projection_shared_and_per_layer():
    shared = HiddenProjection(4, 6, student_layers=3)
    assert len(shared.projections) == 1 and shared.for_layer(0) is shared.for_layer(3)
    per_layer = HiddenProjection(4, 6, student_layers=3, shared=False, bias=False)
    assert len(per_layer.projections) == 4 and per_layer.for_layer(1) is not per_layer.for_layer(2)
    assert sum(p.numel() for p in per_layer.parameters()) == 4 * 4 * 6
    hidden = torch.randn(2, 3, 4)
    assert shared(hidden, 2).shape == (2, 3, 6)
    assert per_layer.for_layer(0).weight.shape == (6, 4)  # nn.Linear(student width, teacher width)
    value = hidden_loss(hidden, torch.randn(2, 3, 6), MASK, per_layer.for_layer(2))
    value.backward()
    assert per_layer.for_layer(2).weight.grad is not None and per_layer.for_layer(1).weight.grad is None
    with pytest.raises(ValueError, match=r"index 4 is outside 0..3"):
        shared.for_layer(4)
    with pytest.raises(ValueError, match="widths and layer count must be >= 1"):
        HiddenProjection(4, 6, student_layers=0)


def test_losses_on_tiny_bert_models_ignore_what_the_padding_holds():
    transformers = pytest.importorskip("transformers")

    def bert(layers, width, seed):
        torch.manual_seed(seed)
        config = transformers.BertConfig(vocab_size=50, hidden_size=width, num_hidden_layers=layers,
                                         num_attention_heads=2, intermediate_size=2 * width,
                                         attn_implementation="eager")
        return transformers.BertModel(config).eval()

    student, teacher = bert(2, 8, 0), bert(4, 16, 1)
    layers = uniform_layer_map(2, 4)
    assert layers == [2, 4]
    projection = HiddenProjection(8, 16, student_layers=2)

    def total(input_ids):
        kwargs = {"attention_mask": MASK, "output_hidden_states": True, "output_attentions": True}
        s, t = student(input_ids, **kwargs), teacher(input_ids, **kwargs)
        loss = embedding_loss(s.hidden_states[0], t.hidden_states[0], MASK, projection.for_layer(0))
        for m, n in enumerate(layers, start=1):
            loss = loss + hidden_loss(s.hidden_states[m], t.hidden_states[n], MASK, projection.for_layer(m))
            loss = loss + attention_loss(s.attentions[m - 1], t.attentions[n - 1], MASK)
        return loss

    ids = torch.tensor([[5, 6, 0], [7, 0, 0]])
    value = total(ids)
    assert torch.isfinite(value) and value > 0
    assert total(ids.masked_fill(MASK == 0, 42)).item() == pytest.approx(value.item(), rel=1e-5)
    value.backward()
    assert projection.for_layer(1).weight.grad.abs().sum() > 0
