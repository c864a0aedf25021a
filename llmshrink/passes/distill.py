"""Distill pass: train the (compressed) model to match a teacher's next-token distribution.

Loss = alpha · KL(teacher || student) at temperature T (· T²) + (1 - alpha) · next-token CE, on
packed blocks of the recipe's `data:` text. The teacher is the model as loaded (`teacher: base`)
or any other model id sharing the tokenizer.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from llmshrink.context import Context
from llmshrink.distill.data import pack
from llmshrink.distill.losses import distill_loss
from llmshrink.distill.trainer import LossFn, train
from llmshrink.errors import LlmshrinkError
from llmshrink.passes.base import PassConfig, PassRecord
from llmshrink.registry import register_pass


class DistillConfig(PassConfig):
    steps: int = Field(..., ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="blocks per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seq_len: int = Field(256, ge=2, description="tokens per block")
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(10, ge=0, description="linear warmup, then cosine decay to zero")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the KD term; 1 - alpha weighs CE")
    temperature: float = Field(2.0, gt=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping; 0 = off")
    train: Literal["all", "compressed"] = Field(
        "all", description="all trainable parameters, or only those of llmshrink's compressed layers"
    )
    teacher: str = Field("base", description="'base' = the model as loaded, or a model id to load")


def logit_kd_loss(alpha: float, temperature: float) -> LossFn:
    """loss_fn for the trainer: distill_loss on the logits of the student and (frozen) teacher."""

    def loss_fn(student: nn.Module, teacher: nn.Module | None, input_ids: torch.Tensor):
        student_logits = student(input_ids=input_ids, use_cache=False).logits
        teacher_logits = None
        if alpha > 0 and teacher is not None:
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        return distill_loss(student_logits, teacher_logits, input_ids, alpha, temperature)

    return loss_fn


def apply(model: nn.Module, cfg: DistillConfig, ctx: Context) -> PassRecord:
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise LlmshrinkError(
            f"distill: {type(model).__name__} is not a causal language model; distill trains next-token models"
        )
    teacher = _teacher(cfg, ctx) if cfg.alpha > 0 else None
    blocks = pack(ctx.train_token_ids(), cfg.seq_len)
    trainable = _select_trainable(model, cfg.train)
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(p in trainable)
        ctx.log(
            f"distill: {cfg.steps} steps on {blocks.shape[0]} blocks of {cfg.seq_len} tokens, "
            f"{sum(p.numel() for p in trainable):,} trainable params, teacher {cfg.teacher if teacher else 'none'}"
        )
        result = train(
            model,
            blocks,
            logit_kd_loss(cfg.alpha, cfg.temperature),
            steps=cfg.steps,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            max_grad_norm=cfg.max_grad_norm,
            seed=ctx.seed,
            device=ctx.device,
            log=ctx.log,
            teacher=teacher,
        )
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.eval()
    ctx.log(
        f"distill: loss {result.first_loss:.4f} -> {result.last_loss:.4f}, "
        f"{result.tokens:,} tokens in {result.seconds:.1f}s ({result.tokens_per_s:.0f} tokens/s)"
    )
    return {
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "final_parts": result.last_parts,
        "lr": cfg.lr,
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "blocks": int(blocks.shape[0]),
        "train": cfg.train,
        "teacher": cfg.teacher if teacher is not None else None,
        "trained_params": sum(p.numel() for p in trainable),
    }


def _teacher(cfg: DistillConfig, ctx: Context) -> nn.Module:
    if cfg.teacher != "base":
        from llmshrink.models import load_base_model  # heavy; only when another teacher is asked for

        return load_base_model(cfg.teacher, device=ctx.device, log=ctx.log).model
    if ctx.teacher is None:
        raise LlmshrinkError(
            "distill: alpha > 0 needs a teacher, and none is loaded: set teacher to a model id, or alpha: 0"
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


register_pass("distill", DistillConfig, apply)
