"""Distillation losses as pure functions of tensors (no models, no state), so each is tested alone.

Shapes: logits (batch, seq, vocab), ids / labels (batch, seq), mask (batch, seq) with 1 = counted.
All losses are computed in float32 whatever the logits' dtype (bf16 softmax loses too much).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmshrink.errors import LlmshrinkError

IGNORE_INDEX = -100  # labels with this value do not count in the cross-entropy


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


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)
