"""The training loop every distillation schedule shares, built on accelerate.

The loss is a callable `loss_fn(student, teacher, input_ids) -> (loss, parts)`, so hidden-state
losses or layer-by-layer schedules only swap the callable (and which parameters are trainable).
The teacher handed to it is frozen: it runs in eval mode under torch.no_grad.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from llmshrink.errors import LlmshrinkError

# loss_fn(student, frozen teacher or None, input_ids) -> (loss, detached parts for logging)
LossFn = Callable[[nn.Module, nn.Module | None, torch.Tensor], tuple[torch.Tensor, dict]]


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken
    tokens: int  # tokens the student was trained on, over all processes
    seconds: float
    tokens_per_s: float
    losses: list[float] = field(repr=False)  # mean loss of each optimizer step
    first_loss: float
    last_loss: float
    last_parts: dict[str, float] = field(default_factory=dict)  # e.g. kd / ce of the last micro-batch


class FrozenTeacher(nn.Module):
    """Runs the wrapped model in eval mode without building a graph, whatever the caller does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        return self  # never leaves eval mode (dropout off)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)


def train(
    student: nn.Module,
    batches: torch.Tensor,
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    log: Callable[[str], None] = print,
    teacher: nn.Module | None = None,
    schedule: str = "cosine",
) -> TrainResult:
    """Train `student` in place for `steps` optimizer steps on rows of `batches` (N x L token ids).

    Micro-batches of `batch_size` rows are drawn in a seeded shuffled order, epoch after epoch;
    `grad_accum` of them make one optimizer step. AdamW over the parameters with requires_grad,
    linear warmup then `schedule` decay ("cosine" or "linear") to zero, gradient clipping at
    `max_grad_norm` (0 = off). Leaves the student in eval mode.
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed
    from transformers import get_scheduler

    if steps < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"steps, batch_size and grad_accum must be >= 1, got {steps}, {batch_size}, {grad_accum}")
    if batches.ndim != 2 or batches.shape[0] == 0:
        raise LlmshrinkError(f"distill: expected a non-empty (blocks, seq_len) batch tensor, got {tuple(batches.shape)}")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise LlmshrinkError("distill: the model has no trainable parameters")

    set_seed(seed)
    dev = torch.device(device) if device is not None else None
    accelerator = Accelerator(
        cpu=dev is not None and dev.type == "cpu",
        # Exact step counts: sync every grad_accum micro-batches, also across epoch ends; the
        # scheduler is stepped by hand once per optimizer step, whatever the process count.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum, sync_with_dataloader=False, adjust_scheduler=False
        ),
    )
    # No decay on biases and norm weights (1-D), as usual for transformers.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=min(warmup_steps, steps), num_training_steps=steps
    )
    loader = DataLoader(
        TensorDataset(batches.long()),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    model, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    frozen = FrozenTeacher(teacher.to(accelerator.device)) if teacher is not None else None

    model.train()
    losses: list[float] = []
    step_loss, micro, tokens = 0.0, 0, 0
    parts: dict = {}
    bar = tqdm(
        total=steps,
        desc="distill",
        unit="step",
        mininterval=1.0,
        disable=None if accelerator.is_local_main_process else True,  # None: off when not a TTY
    )
    log_every = max(1, steps // 10)
    start = time.perf_counter()
    try:
        for (input_ids,) in _cycle(loader):
            with accelerator.accumulate(model):
                loss, parts = loss_fn(model, frozen, input_ids)
                if not torch.isfinite(loss):
                    raise LlmshrinkError(
                        f"distill: loss became {loss.item()} at step {len(losses) + 1}: lower lr (now {lr})"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.item()
            micro += 1
            tokens += input_ids.numel() * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            losses.append(step_loss / micro)
            step_loss, micro = 0.0, 0
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            if bar.disable and (len(losses) % log_every == 0 or len(losses) == steps):
                log(f"distill: step {len(losses)}/{steps} loss {losses[-1]:.4f} ({rate:.0f} tokens/s)")
            if len(losses) == steps:
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    accelerator.unwrap_model(model).eval()
    return TrainResult(
        steps=len(losses),
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / max(seconds, 1e-9),
        losses=losses,
        first_loss=losses[0],
        last_loss=losses[-1],
        last_parts={k: float(v) for k, v in parts.items()},
    )


def _cycle(loader: DataLoader) -> Iterator:
    # A seeded sampler reshuffles deterministically at every new epoch.
    while True:
        yield from loader
