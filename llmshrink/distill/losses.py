"""Distillation losses as pure functions of tensors (no models, no state), so each is tested alone.

Shapes: logits (batch, seq, vocab), ids / labels (batch, seq), mask (batch, seq) with 1 = counted,
hidden states (batch, seq, dim), attention probabilities (batch, heads, query, key).
All losses are computed in float32 whatever the logits' dtype (bf16 softmax loses too much).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmshrink.errors import LlmshrinkError

IGNORE_INDEX = -100  # labels with this value do not count in the cross-entropy
ATTENTION_EPS = 1e-8  # floor on student attention probabilities inside the log


def kd_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) · T², averaged over the (unmasked) token positions.

    The T² factor keeps the gradient scale independent of T (Hinton et al., 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise LlmshrinkError(
            f"distill: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the teacher must share the student's tokenizer"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return _masked_mean(per_token, mask) * temperature**2


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position i predicts labels[i + 1]; the last position has no label."""
    shifted = labels[:, 1:]
    if mask is not None:
        shifted = shifted.masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX
    )


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha · KD + (1 - alpha) · CE, and the detached parts {"kd", "ce", "loss"} for logging.

    KD uses positions 0..L-2, the same positions CE scores (the last one predicts a token outside
    the block), so both terms average over the same predictions. With alpha == 0 the teacher may
    be None and KD is not computed; with alpha == 1 CE is still computed, for logging only.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ce = ce_loss(student_logits, input_ids, mask)
    parts = {"ce": ce.detach()}
    if alpha > 0:
        if teacher_logits is None:
            raise LlmshrinkError("distill: alpha > 0 needs a teacher")
        kd_mask = None if mask is None else mask[:, :-1] * mask[:, 1:]
        kd = kd_kl_loss(student_logits[:, :-1], teacher_logits[:, :-1], temperature, kd_mask)
        parts["kd"] = kd.detach()
        # alpha == 1 leaves CE out of the graph (it is still logged).
        loss = kd if alpha == 1.0 else alpha * kd + (1.0 - alpha) * ce
    else:
        loss = ce
    parts["loss"] = loss.detach()
    return loss, parts


def hidden_mse_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared error averaged over the hidden dimension, then over the (unmasked) tokens."""
    _check_hidden(student_hidden, teacher_hidden)
    per_token = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(dim=-1)
    return _masked_mean(per_token, mask)


def hidden_cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - cosine(student, teacher) per token, averaged over the (unmasked) tokens; blind to scale."""
    _check_hidden(student_hidden, teacher_hidden)
    per_token = 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return _masked_mean(per_token, mask)


def layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student -> teacher hidden-state index pairs, over the num_layers + 1 hidden states of each.

    Index 0 (embeddings) maps to 0 and the last to the last; the rest spread evenly, rounded to
    the nearest teacher layer (student layer m -> teacher m · T / S, as in TinyBERT/DistilBERT).
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got {student_layers} and {teacher_layers}")
    # (2·m·T + S) // (2·S) is round-half-up of m·T/S in exact integer arithmetic.
    return [(m, (2 * m * teacher_layers + student_layers) // (2 * student_layers)) for m in range(student_layers + 1)]


def attention_kl_loss(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher row || student row) of attention probabilities, averaged over heads and queries.

    Each (batch, head, query) row is a distribution over keys. `mask` (batch, query) drops query
    positions; keys the models masked have probability 0 in both, and 0 · log 0 counts as 0.
    """
    if student_attn.ndim != 4 or student_attn.shape != teacher_attn.shape:
        s_shape, t_shape = tuple(student_attn.shape), tuple(teacher_attn.shape)
        if student_attn.ndim == 4 == teacher_attn.ndim and student_attn.shape[1] != teacher_attn.shape[1]:
            raise LlmshrinkError(
                f"distill: student attention has {s_shape[1]} heads, teacher {t_shape[1]}: "
                "attention_weight needs equal head counts; set attention_weight: 0"
            )
        raise LlmshrinkError(
            f"distill: attention maps {s_shape} and {t_shape} differ; expected equal (batch, heads, query, key)"
        )
    p = teacher_attn.float()
    # Clamped so a student probability of 0 where the teacher's is not gives a large finite loss.
    log_q = student_attn.float().clamp_min(ATTENTION_EPS).log()
    per_row = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)  # (batch, heads, query)
    return _masked_mean(per_row.mean(dim=1), mask)



def _check_hidden(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> None:
    if student_hidden.shape != teacher_hidden.shape:
        raise LlmshrinkError(
            f"distill: student hidden states {tuple(student_hidden.shape)} and teacher's "
            f"{tuple(teacher_hidden.shape)} differ: widths that differ need a projection"
        )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)
