"""Distillation losses as pure functions of tensors (no models, no state), so each is tested alone.

Shapes: logits (batch, seq, vocab), ids / labels (batch, seq), mask (batch, seq) with 1 = counted,
hidden states (batch, seq, dim), attention probabilities (batch, heads, query, key).
All losses are computed in float32 whatever the logits' dtype (bf16 softmax loses too much).
"""

from __future__ import annotations

import math

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
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return _masked_mean(per_token, mask) * temperature**2


# The divergences below share kd_kl_loss's signature (plus their own weight, keyword-only) and its
# conventions: p = softmax(teacher/T), q = softmax(student/T), mean over unmasked tokens, times T².
forward_kl = kd_kl_loss  # mode-covering: the classic KD term, kept as one function so numbers never drift


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(q || p) · T² (MiniLLM): mode-seeking, the student is not pushed onto the teacher's tail."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _masked_mean(_kl(log_q, log_p), mask) * temperature**2


def jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalized JSD (GKD): β·KL(p || m) + (1-β)·KL(q || m), m = β·p + (1-β)·q, times T².

    Symmetric at β = 1/2; as β -> 0 it tends to β·KL(p || q). Bounded by the entropy of (β, 1-β).
    """
    _check_open_unit("jsd beta", beta)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    log_m = _log_mix(log_p, log_q, beta)
    per_token = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return _masked_mean(per_token, mask) * temperature**2


def skew_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    *,
    skew: float = 0.1,
) -> torch.Tensor:
    """Skew KL (DistiLLM): KL(p || skew·p + (1-skew)·q) · T²; forward KL as skew -> 0, at most -ln(skew)."""
    _check_open_unit("skew", skew)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _masked_mean(_kl(log_p, _log_mix(log_p, log_q, skew)), mask) * temperature**2


def skew_rkl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    *,
    skew: float = 0.1,
) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q || (1-skew)·p + skew·q) · T²; reverse KL as skew -> 0."""
    _check_open_unit("skew", skew)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _masked_mean(_kl(log_q, _log_mix(log_p, log_q, 1.0 - skew)), mask) * temperature**2


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl")


def kd_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    *,
    skew: float = 0.1,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """The divergence called `name` (one of DIVERGENCES), each given only the weight it uses."""
    if name == "forward_kl":
        return forward_kl(student_logits, teacher_logits, temperature, mask)
    if name == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    if name == "jsd":
        return jsd(student_logits, teacher_logits, temperature, mask, beta=jsd_beta)
    if name == "skew_kl":
        return skew_kl(student_logits, teacher_logits, temperature, mask, skew=skew)
    if name == "skew_rkl":
        return skew_rkl(student_logits, teacher_logits, temperature, mask, skew=skew)
    raise ValueError(f"unknown distillation loss {name!r}; expected one of {', '.join(DIVERGENCES)}")


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
    *,
    loss: str = "forward_kl",
    skew: float = 0.1,
    jsd_beta: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha · KD + (1 - alpha) · CE, and the detached parts {"kd", "ce", "loss"} for logging.

    KD is the divergence `loss` (see kd_divergence; `skew` / `jsd_beta` are its weights).

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
        kd = kd_divergence(loss, student_logits[:, :-1], teacher_logits[:, :-1], temperature, kd_mask,
                           skew=skew, jsd_beta=jsd_beta)
        parts["kd"] = kd.detach()
        # alpha == 1 leaves CE out of the graph (it is still logged).
        total = kd if alpha == 1.0 else alpha * kd + (1.0 - alpha) * ce
    else:
        total = ce
    parts["loss"] = total.detach()
    return total, parts


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


def _log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q, log p) at temperature T, in float32, after checking shapes and T."""
    if student_logits.shape != teacher_logits.shape:
        raise LlmshrinkError(
            f"distill: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the teacher must share the student's tokenizer"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return log_q, log_p


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per token from log-probabilities (same formula as kd_kl_loss's)."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight·p + (1-weight)·q) via logsumexp: never leaves log space, so tiny p or q stay exact."""
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log(1.0 - weight))


def _check_open_unit(what: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{what} must be in (0, 1), got {value}")


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
