"""Local distillation: each compressed layer learns to reproduce its dense original's outputs.

For every compressed layer (KroneckerLinear, ...) the teacher holds the dense layer of the same
name. One teacher forward per batch records each such layer's input X and output Y = W X (forward
hooks); the compressed layers are then trained on the normalised error ||f(X) - Y||² / mean(Y²),
all at once and independently (the inputs are the teacher's, so no layer waits for another). No
student forward or backward through the whole model: a step costs about one teacher forward,
several times cheaper than a logit-KD step. It fits the layers to the activations they will see
(calibration-aware), where the compression itself only looked at the weights; a short global
distill afterwards repairs what the layers cannot do alone.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from llmshrink.context import Context
from llmshrink.distill.curves import training_curve
from llmshrink.distill.data import pack
from llmshrink.distill.trainer import LossFn, train
from llmshrink.distill.training_modes import trainable_params
from llmshrink.errors import LlmshrinkError
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.local_distill import LocalDistillConfig
from llmshrink.targeting import is_dense_layer, layer_index


class LocalStudent(nn.Module):
    """The compressed layers being fitted, as one module (so the trainer optimises them together)."""

    def __init__(self, names: list[str], layers: list[nn.Module]):
        super().__init__()
        self.names = names
        self.layers = nn.ModuleList(layers)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # Called through forward (not layer by layer) so that accelerate's DDP wrapper syncs gradients.
        return [layer(x) for layer, x in zip(self.layers, inputs, strict=True)]


def local_loss(teacher_layers: list[nn.Module]) -> LossFn:
    """loss_fn: one teacher forward records the dense layers' inputs and outputs; the mean over
    layers of ||f(X) - Y||² / mean(Y²) is the loss (1.0 = as bad as predicting zeros)."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(index: int):
        def hook(module, args, output):
            seen[index] = (args[0].detach(), output.detach())

        return hook

    def loss_fn(model: nn.Module, teacher: nn.Module | None, input_ids: torch.Tensor):
        handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(teacher_layers)]
        try:
            teacher(input_ids=input_ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        pairs = [seen.pop(i) for i in range(len(teacher_layers))]
        outputs = model([x for x, _ in pairs])
        terms = torch.stack([(f - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-12)
                             for f, (_, y) in zip(outputs, pairs, strict=True)])
        loss = terms.mean()
        return loss, {"local": loss.detach(), "worst": terms.max().detach()}

    return loss_fn


def apply(model: nn.Module, cfg: LocalDistillConfig, ctx: Context) -> PassRecord:
    from llmshrink.modules import COMPRESSED_MODULES

    if ctx.teacher is None:
        raise LlmshrinkError("local_distill: needs the teacher (the model as loaded); run it through `llmshrink apply`")
    options = cfg.trainer_options("local_distill", ctx)
    kinds = tuple(COMPRESSED_MODULES.values())
    chosen = [
        (name, m) for name, m in model.named_modules()
        # Layers that hold weights and replaced a dense layer: a shared-block reference owns none, and a compressed
        # embedding table (no in_features) replaced a lookup, which this pass does not fit.
        if isinstance(m, kinds) and next(m.parameters(), None) is not None and hasattr(m, "in_features")
        and re.fullmatch(cfg.targets, name)
        and not (cfg.exclude and re.fullmatch(cfg.exclude, name))
        and (cfg.layers is None or layer_index(name) in cfg.layers)
    ]
    if not chosen:
        raise LlmshrinkError(
            f"local_distill: no compressed layer matches targets {cfg.targets!r}"
            + (f" in layers {cfg.layers}" if cfg.layers is not None else "")
            + ": put a compression pass before this one"
        )
    teacher_layers = []
    for name, _ in chosen:
        dense = dict(ctx.teacher.named_modules()).get(name)
        if dense is None or not is_dense_layer(dense):
            raise LlmshrinkError(f"local_distill: the teacher has no dense layer {name} to match; use teacher: base")
        teacher_layers.append(dense)
    names = [name for name, _ in chosen]
    student = LocalStudent(names, [m for _, m in chosen])
    blocks = pack(ctx.train_token_ids(), cfg.seq_len)
    with trainable_params(model):
        model.requires_grad_(False)
        student.requires_grad_(True)
        trainable = sum(p.numel() for p in student.parameters())
        ctx.log(f"local_distill: {len(names)} layers, {trainable:,} params, {cfg.steps} steps on "
                f"{blocks.shape[0]} blocks of {cfg.seq_len} tokens")
        result = train(
            student,
            blocks,
            local_loss(teacher_layers),
            **options,
            teacher=ctx.teacher,
            desc="local_distill",
        )
    ctx.log(result.log_line("local_distill: normalised error"))
    return {
        "layers": names,
        **result.summary(),
        "trained_params": trainable,
        "lr": cfg.lr,
        "curve": training_curve(result),
    }
