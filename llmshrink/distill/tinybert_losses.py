"""TinyBERT's layer-wise distillation losses for encoders (Jiao et al. 2020, "TinyBERT: Distilling BERT
for Natural Language Understanding"), as pure functions of tensors like distill/losses.py.

A student of M layers learns from a teacher of N through: the embeddings (L_embd), the hidden states
and attention matrices of mapped layer pairs (L_hidn, L_attn), and the predictions (L_pred). Shapes:
hidden states (batch, seq, width), attention (batch, heads, query, key), `mask` (batch, seq) with
1 = real token, 0 = padding. Padding contributes nothing: every loss averages over the real tokens
(for attention, the real query-key pairs) of the whole batch. That is one deliberate departure from
the official code, which averages over padded positions too (zeros there), so its values shrink as
padding grows. All losses are computed in float32, whatever the inputs' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmshrink.distill.losses import _masked_mean, hidden_mse_loss, layer_map


def embedding_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    mask: torch.Tensor | None = None,
    projection: nn.Module | None = None,
) -> torch.Tensor:
    """L_embd = MSE(E_S·W_e, E_T): squared error averaged over the width, then over the real tokens.

    `projection` is W_e, an nn.Linear(student width, teacher width), needed when the widths differ.
    """
    return _projected_mse("embedding_loss", student_emb, teacher_emb, mask, projection)


def hidden_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    projection: nn.Module | None = None,
) -> torch.Tensor:
    """L_hidn = MSE(H_S·W_h, H_T) for one mapped pair of layer outputs, averaged like embedding_loss."""
    return _projected_mse("hidden_loss", student_hidden, teacher_hidden, mask, projection)


def attention_loss(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L_attn = (1/h)·Σ_heads MSE(A_S, A_T) over the real (query, key) pairs of one mapped layer pair.

    TinyBERT compares the unnormalised scores QKᵀ/√d (before softmax), which carry more signal than
    probabilities; that needs a hook on the attention modules, since Hugging Face models return
    softmax probabilities with output_attentions=True. Either is accepted, the caller says which by
    what it passes; teacher and student must be the same kind. Entries with a padded query or key are
    dropped before subtracting (the official code instead zeroes scores <= -100), so the -inf or
    -10000 that masked scores hold give neither NaN nor gradient.
    """
    if student_attn.ndim != 4 or teacher_attn.ndim != 4:
        raise ValueError(
            f"attention_loss: expected (batch, heads, query, key) maps, got {tuple(student_attn.shape)} "
            f"and {tuple(teacher_attn.shape)}"
        )
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(
            f"attention_loss: student has {student_attn.shape[1]} heads, teacher {teacher_attn.shape[1]}; "
            "attention is matched head by head, so the head counts must be equal"
        )
    if student_attn.shape != teacher_attn.shape or student_attn.shape[-1] != student_attn.shape[-2]:
        raise ValueError(
            f"attention_loss: attention maps {tuple(student_attn.shape)} and {tuple(teacher_attn.shape)} "
            "differ or are not square; expected equal (batch, heads, seq, seq)"
        )
    batch, _, seq, _ = student_attn.shape
    student, teacher = student_attn.float(), teacher_attn.float()
    if mask is None:
        return (student - teacher).pow(2).mean()
    _check_mask("attention_loss", mask, (batch, seq))
    real = mask.bool()
    pairs = real[:, :, None] & real[:, None, :]  # (batch, query, key)
    keep = pairs[:, None]  # broadcast over heads
    zero = student.new_zeros(())
    per_pair = (torch.where(keep, student, zero) - torch.where(keep, teacher, zero)).pow(2).mean(dim=1)
    return _masked_mean(per_pair, pairs)


def prediction_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_pred = -softmax(z_T/t)·log_softmax(z_S/t), summed over classes, averaged over examples.

    Logits are (batch, classes), or (batch, seq, classes) for token-level tasks with `mask` (batch, seq)
    dropping the padded tokens. This is soft cross-entropy as the paper writes it: no t² factor (unlike
    kd_kl_loss), and it equals KL(p || q) plus the teacher's entropy, so it is not 0 when the student
    matches the teacher, though its gradient is KL's. The official code also divides by the number of
    classes (a mean over all entries); here the classes are summed.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"prediction_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; they must score the same labels"
        )
    if temperature <= 0:
        raise ValueError(f"prediction_loss: temperature must be > 0, got {temperature}")
    if mask is not None:
        _check_mask("prediction_loss", mask, tuple(student_logits.shape[:-1]))
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return _masked_mean(-(p * log_q).sum(dim=-1), mask)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's uniform strategy g(m) = m·N/M: the teacher layer for each student layer m = 1..M.

    Layers count from 1, as in hidden_states (index 0 is the embeddings, always mapped 0 -> 0); the
    attention of layer m is attentions[m - 1]. The paper takes N a multiple of M (k = N/M, so (4, 12)
    gives [3, 6, 9, 12]); otherwise m·N/M is rounded half up (as distill.losses.layer_map does), so
    (4, 6) gives [2, 3, 5, 6]: spread evenly, the last layer always last. A student deeper than its
    teacher raises: some student layers would share a teacher layer, and none should.
    """
    if student_layers > teacher_layers >= 1:
        raise ValueError(
            f"uniform_layer_map: the student has more layers ({student_layers}) than the teacher "
            f"({teacher_layers}); each student layer needs its own teacher layer"
        )
    return [teacher for _, teacher in layer_map(student_layers, teacher_layers)[1:]]


class HiddenProjection(nn.Module):
    """The learned projections from the student's width to the teacher's, for the embeddings (index 0)
    and each student layer m = 1..M, to pass as `projection` to embedding_loss / hidden_loss.

    shared=True (the default) learns one matrix for all of them, as the official TinyBERT code does
    (its single `fit_dense`; the paper writes W_e and W_h without a layer index). shared=False learns
    one per hidden state, as llmshrink's decoder distillation does (ProjectedStudent): more parameters,
    each layer free to sit in its own basis. bias=True matches fit_dense, an nn.Linear with bias.
    The module must be trained along with the student (give its parameters to the optimizer), and is
    dropped afterwards: it is not part of the compressed model.
    """

    def __init__(
        self, student_width: int, teacher_width: int, student_layers: int, *, shared: bool = True, bias: bool = True
    ):
        super().__init__()
        if min(student_width, teacher_width) < 1 or student_layers < 1:
            raise ValueError(
                f"HiddenProjection: widths and layer count must be >= 1, got {student_width}, "
                f"{teacher_width} and {student_layers}"
            )
        self.student_layers = student_layers
        self.shared = shared
        count = 1 if shared else student_layers + 1
        self.projections = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=bias) for _ in range(count))

    def for_layer(self, index: int) -> nn.Linear:
        """The projection of hidden state `index`: 0 = embeddings (W_e), m = student layer m (W_h)."""
        if not 0 <= index <= self.student_layers:
            raise ValueError(f"HiddenProjection: index {index} is outside 0..{self.student_layers}")
        return self.projections[0 if self.shared else index]

    def forward(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        return self.for_layer(index)(hidden)


def _projected_mse(
    name: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    projection: nn.Module | None,
) -> torch.Tensor:
    """hidden_mse_loss(student·W, teacher, mask) after checking the widths, the projection and the mask."""
    if student.ndim != 3 or teacher.ndim != 3:
        raise ValueError(
            f"{name}: expected (batch, seq, width) tensors, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    s_width, t_width = student.shape[-1], teacher.shape[-1]
    if projection is None and s_width != t_width:
        raise ValueError(
            f"{name}: student width {s_width} differs from teacher width {t_width}; "
            f"pass a projection (nn.Linear({s_width}, {t_width}), e.g. HiddenProjection.for_layer)"
        )
    if projection is not None:
        student = projection(student)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: {'projected ' if projection is not None else ''}student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)} differ"
        )
    if mask is not None:
        _check_mask(name, mask, tuple(student.shape[:2]))
    return hidden_mse_loss(student, teacher, mask)


def _check_mask(name: str, mask: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: mask {tuple(mask.shape)} does not match the inputs' {tuple(shape)}")
