"""Distill pass: train the (compressed) model to match a teacher's next-token distribution.

Loss = alpha · D(teacher, student) at temperature T (· T²) + (1 - alpha) · next-token CE
     + hidden_weight · hidden-state MSE/cosine (mean over the layer map's pairs)
     + attention_weight · attention-map KL (mean over the map's block pairs),
on packed blocks of the recipe's `data:` text. D is `loss:` forward KL (default), reverse KL, generalized
JSD or skew (reverse) KL, from distill/losses.py. The teacher is the model as loaded (`teacher: base`)
or any other model id sharing the tokenizer. When widths differ, learned linear projections map
the student's hidden states to the teacher's; they train with the student and are then dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llmshrink.context import Context
from llmshrink.distill.curves import training_curve
from llmshrink.distill.data import pack
from llmshrink.distill.losses import (
    attention_kl_loss,
    distill_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    layer_map,
)
from llmshrink.distill.trainer import LossFn, train
from llmshrink.distill.training_modes import eager_attention, trainable_params
from llmshrink.errors import LlmshrinkError
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.distill import DistillConfig
from llmshrink.targeting import require_causal_lm


def logit_kd_loss(
    alpha: float, temperature: float, *, loss: str = "forward_kl", skew: float = 0.1, jsd_beta: float = 0.5
) -> LossFn:
    """loss_fn for the trainer: distill_loss on the logits of the student and (frozen) teacher."""

    def loss_fn(student: nn.Module, teacher: nn.Module | None, input_ids: torch.Tensor):
        student_logits = student(input_ids=input_ids, use_cache=False).logits
        teacher_logits = None
        if alpha > 0 and teacher is not None:
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        return distill_loss(student_logits, teacher_logits, input_ids, alpha, temperature,
                            loss=loss, skew=skew, jsd_beta=jsd_beta)

    return loss_fn


class ProjectedStudent(nn.Module):
    """The student and the projections of its mapped hidden states to the teacher's widths.

    One module, so the trainer (and accelerate's wrapping) optimises both. forward returns
    (student output, projected hidden states, one per pair of the layer map).
    """

    def __init__(self, student: nn.Module, projections: nn.ModuleList, student_indices: Sequence[int]):
        super().__init__()
        self.student = student
        self.projections = projections
        self.student_indices = list(student_indices)

    def forward(self, **kwargs):
        out = self.student(**kwargs)
        hidden = [proj(out.hidden_states[i]) for proj, i in zip(self.projections, self.student_indices, strict=True)]
        return out, hidden


def feature_kd_loss(
    alpha: float,
    temperature: float,
    pairs: Sequence[tuple[int, int]],
    hidden_weight: float = 0.0,
    hidden_loss: str = "mse",
    attention_weight: float = 0.0,
    *,
    loss: str = "forward_kl",
    skew: float = 0.1,
    jsd_beta: float = 0.5,
) -> LossFn:
    """loss_fn: distill_loss + hidden_weight · hidden term + attention_weight · attention term.

    `pairs` are student -> teacher hidden-state indices; attention uses the block pairs among them
    (hidden state i is block i - 1's output). The student may be a ProjectedStudent. With both
    weights 0 this is exactly logit_kd_loss.
    """
    if hidden_weight == 0 and attention_weight == 0:
        return logit_kd_loss(alpha, temperature, loss=loss, skew=skew, jsd_beta=jsd_beta)
    hidden_fn = {"mse": hidden_mse_loss, "cosine": hidden_cosine_loss}[hidden_loss]
    block_pairs = [(s - 1, t - 1) for s, t in pairs if s > 0 and t > 0]

    def loss_fn(student: nn.Module, teacher: nn.Module | None, input_ids: torch.Tensor):
        if teacher is None:
            raise LlmshrinkError("distill: hidden_weight or attention_weight > 0 needs a teacher")
        kwargs = dict(input_ids=input_ids, use_cache=False, output_hidden_states=hidden_weight > 0,
                      output_attentions=attention_weight > 0)
        s_out = student(**kwargs)
        s_out, s_hidden = s_out if isinstance(s_out, tuple) else (s_out, None)
        t_out = teacher(**kwargs)
        total, parts = distill_loss(s_out.logits, t_out.logits if alpha > 0 else None, input_ids, alpha,
                                    temperature, loss=loss, skew=skew, jsd_beta=jsd_beta)
        if hidden_weight > 0:
            if s_hidden is None:
                s_hidden = [s_out.hidden_states[s] for s, _ in pairs]
            terms = [hidden_fn(h, t_out.hidden_states[t]) for h, (_, t) in zip(s_hidden, pairs, strict=True)]
            hidden = torch.stack(terms).mean()
            parts["hidden"] = hidden.detach()
            total = total + hidden_weight * hidden
        if attention_weight > 0:
            if not s_out.attentions or not t_out.attentions:
                raise LlmshrinkError(
                    "distill: attention_weight > 0 but a model returned no attention maps: it needs "
                    "attn_implementation='eager'"
                )
            terms = [attention_kl_loss(s_out.attentions[s], t_out.attentions[t]) for s, t in block_pairs]
            attention = torch.stack(terms).mean()
            parts["attention"] = attention.detach()
            total = total + attention_weight * attention
        parts["loss"] = total.detach()
        return total, parts

    return loss_fn


def apply(model: nn.Module, cfg: DistillConfig, ctx: Context) -> PassRecord:
    require_causal_lm(model, "distill: trains next-token models", "use task_distill on an encoder")
    features = cfg.hidden_weight > 0 or cfg.attention_weight > 0
    teacher = _teacher(cfg, ctx) if cfg.alpha > 0 or features else None
    options = cfg.trainer_options("distill", ctx)
    blocks = pack(ctx.train_token_ids(), cfg.seq_len)
    trainable = _select_trainable(model, cfg.train)
    pairs: list[tuple[int, int]] = []
    student: nn.Module = model
    if features:
        assert teacher is not None
        pairs, student = _feature_setup(model, teacher, cfg, blocks[:1, :2], ctx.seed)
    eval_fn, eval_data = _periodic_eval(cfg, ctx)
    with trainable_params(model):
        for p in model.parameters():
            p.requires_grad_(p in trainable)
        projection_params = sum(p.numel() for p in student.parameters()) - sum(p.numel() for p in model.parameters())
        ctx.log(
            f"distill: {cfg.steps} steps on {blocks.shape[0]} blocks of {cfg.seq_len} tokens, "
            f"{sum(p.numel() for p in trainable):,} trainable params, teacher {cfg.teacher if teacher else 'none'}"
            + (f", {projection_params:,} projection params" if projection_params else "")
        )
        loss_fn = feature_kd_loss(
            cfg.alpha, cfg.temperature, pairs, cfg.hidden_weight, cfg.hidden_loss, cfg.attention_weight,
            loss=cfg.loss, skew=cfg.skew, jsd_beta=cfg.jsd_beta,
        )
        with eager_attention([model, teacher] if cfg.attention_weight > 0 else [], "distill"):
            result = train(
                student,
                blocks,
                loss_fn,
                **options,
                teacher=teacher,
                mixed_precision=cfg.mixed_precision,
                gradient_checkpointing=cfg.gradient_checkpointing,
                eval_fn=eval_fn,
                eval_every=cfg.eval_every,
            )
    ctx.log(result.log_line("distill: loss"))
    record: PassRecord = {
        **result.summary(),
        "lr": cfg.lr,
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "loss": cfg.loss,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "blocks": int(blocks.shape[0]),
        "train": cfg.train,
        "teacher": cfg.teacher if teacher is not None else None,
        "trained_params": sum(p.numel() for p in trainable),
        "hidden_weight": cfg.hidden_weight,
        "attention_weight": cfg.attention_weight,
        "mixed_precision": cfg.mixed_precision,
        "eval_data": eval_data,
        "curve": training_curve(result),
    }
    if cfg.loss in ("skew_kl", "skew_rkl"):
        record["skew"] = cfg.skew
    elif cfg.loss == "jsd":
        record["jsd_beta"] = cfg.jsd_beta
    if features:
        record |= {"hidden_loss": cfg.hidden_loss, "layer_map": [list(p) for p in pairs],
                   "projection_params": projection_params}
    return record


def _periodic_eval(cfg: DistillConfig, ctx: Context):
    """(eval_fn for the trainer or None, what it measures): the held-out part of data: if there is
    one, else the recipe's evaluate perplexity (ctx.evaluate)."""
    if not cfg.eval_every:
        return None, None
    if ctx.data is not None and ctx.data.heldout > 0:  # a mix: its corpus's held-out part
        from llmshrink.eval.perplexity import perplexity

        ids = ctx.heldout_token_ids()[: cfg.eval_tokens]
        window = min(cfg.seq_len, ids.numel())

        def heldout_ppl(student: nn.Module) -> float:
            inner = student.student if isinstance(student, ProjectedStudent) else student
            return perplexity(inner, ids, window, max(1, window // 2), cfg.batch_size, ctx.device,
                              progress=False).ppl

        return heldout_ppl, f"data.heldout ({ids.numel()} tokens)"
    if ctx.evaluate is None:
        raise LlmshrinkError(
            "distill.eval_every: needs held-out text (set data.heldout > 0) or evaluate.perplexity in the recipe"
        )
    evaluate = ctx.evaluate
    return (lambda student: evaluate(student.student if isinstance(student, ProjectedStudent) else student),
            "evaluate.perplexity")


def _feature_setup(
    model: nn.Module, teacher: nn.Module, cfg: DistillConfig, probe: torch.Tensor, seed: int
) -> tuple[list[tuple[int, int]], nn.Module]:
    """The layer map (checked against both models) and the student to train: the model itself, or
    a ProjectedStudent when hidden widths differ. Depths and widths come from one tiny forward."""
    s_widths, t_widths = _hidden_widths(model, probe), _hidden_widths(teacher, probe)
    pairs = list(cfg.layer_map) if cfg.layer_map is not None else layer_map(len(s_widths) - 1, len(t_widths) - 1)
    for s, t in pairs:
        if s >= len(s_widths) or t >= len(t_widths):
            raise LlmshrinkError(
                f"distill.layer_map: pair ({s}, {t}) out of range: the student has hidden states "
                f"0..{len(s_widths) - 1}, the teacher 0..{len(t_widths) - 1}"
            )
    if not pairs:
        raise LlmshrinkError("distill.layer_map: empty; give at least one (student, teacher) pair")
    if cfg.attention_weight > 0 and not any(s > 0 and t > 0 for s, t in pairs):
        raise LlmshrinkError("distill.layer_map: no block pairs (both indices > 0) for attention_weight")
    if cfg.hidden_weight == 0 or all(s_widths[s] == t_widths[t] for s, t in pairs):
        return pairs, model
    ref = next(p for p in model.parameters() if p.is_floating_point())
    with torch.random.fork_rng(devices=[]):  # seeded init without moving the global RNG
        torch.manual_seed(seed)
        projections = nn.ModuleList(
            nn.Linear(s_widths[s], t_widths[t], bias=False) if s_widths[s] != t_widths[t] else nn.Identity()
            for s, t in pairs
        ).to(device=ref.device, dtype=ref.dtype)
    return pairs, ProjectedStudent(model, projections, [s for s, _ in pairs])


def _hidden_widths(model: nn.Module, probe: torch.Tensor) -> list[int]:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=probe.to(device), use_cache=False, output_hidden_states=True)
    return [h.shape[-1] for h in out.hidden_states]


def _teacher(cfg: DistillConfig, ctx: Context) -> nn.Module:
    if cfg.teacher != "base":
        from llmshrink.models import load_base_model  # heavy; only when another teacher is asked for

        return load_base_model(cfg.teacher, device=ctx.device, log=ctx.log).model
    if ctx.teacher is None:
        why = "alpha > 0" if cfg.alpha > 0 else "hidden_weight or attention_weight > 0"
        raise LlmshrinkError(
            f"distill: {why} needs a teacher, and none is loaded: set teacher to a model id, or {why.split()[0]}: 0"
        )
    return ctx.teacher


def _select_trainable(model: nn.Module, which: str) -> set[nn.Parameter]:
    """The parameters to optimise; frozen ones (requires_grad False, e.g. quantized) stay frozen."""
    if which == "all":
        chosen = {p for p in model.parameters() if p.requires_grad}
    else:
        from llmshrink.modules import COMPRESSED_MODULES

        kinds = tuple(COMPRESSED_MODULES.values())
        chosen = {
            p for m in model.modules() if isinstance(m, kinds) for p in m.parameters() if p.requires_grad
        }
        if not chosen:
            raise LlmshrinkError(
                "distill.train: 'compressed' but the model has no trainable compressed layers: "
                "put a compression pass before this one, or use train: all"
            )
    if not chosen:
        raise LlmshrinkError("distill: the model has no trainable parameters")
    return chosen
