"""The training loop every distillation schedule shares, built on accelerate.

The loss is a callable `loss_fn(student, teacher, input_ids) -> (loss, parts)`, so hidden-state
losses or layer-by-layer schedules only swap the callable (and which parameters are trainable).
The teacher handed to it is frozen: it runs in eval mode under torch.no_grad.

Options: `mixed_precision` ("no", "bf16", or "fp16" on GPUs only) runs the loss under accelerate's
autocast; `gradient_checkpointing` recomputes activations in the backward pass (less memory, same
numbers); `eval_fn` is called on the student at step 0, every `eval_every` steps and at the end, and
its values are recorded in `TrainResult.evals`.

Resume: with `state_dir` and `save_every`, the loop snapshots its state into `state_dir/step-<k>/`
and a rerun continues from the newest snapshot; `distill.train_state` writes and reads them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from llmshrink.distill.train_state import (
    EpochShuffle,
    get_rng,
    load_optim,
    load_rng,
    load_trainable,
    resume_point,
    run_settings,
    save_state,
    set_rng,
)
from llmshrink.errors import LlmshrinkError

# loss_fn(student, frozen teacher or None, input_ids) -> (loss, detached parts for logging)
LossFn = Callable[[nn.Module, nn.Module | None, torch.Tensor], tuple[torch.Tensor, dict]]
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken
    tokens: int  # tokens the student was trained on, over all processes
    seconds: float  # training time of this call, evaluations excluded
    tokens_per_s: float
    losses: list[float] = field(repr=False)  # mean loss of each optimizer step, over all processes
    first_loss: float
    last_loss: float
    last_parts: dict[str, float] = field(default_factory=dict)  # e.g. kd / ce of the last micro-batch
    step_tokens: list[int] = field(default_factory=list, repr=False)  # tokens so far after each step
    evals: list[tuple[int, int, float]] = field(default_factory=list)  # (step, tokens so far, eval_fn value)

    def summary(self) -> dict:
        """What a training pass's record says of this run (its curve aside)."""
        return {"steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens_per_s, 1), "first_loss": self.first_loss,
                "last_loss": self.last_loss, "final_parts": self.last_parts}

    def log_line(self, what: str, unit: str = "tokens") -> str:
        """`what` (e.g. "distill: loss"), then the first and last loss, what was seen (`tokens` counts `unit`:
        the task passes count examples), time and throughput."""
        return (f"{what} {self.first_loss:.4f} -> {self.last_loss:.4f}, {self.tokens:,} {unit} in "
                f"{self.seconds:.1f}s ({self.tokens_per_s:.0f} {unit}/s)")


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
    state_dir: str | Path | None = None,
    save_every: int = 0,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    eval_fn: Callable[[nn.Module], float] | None = None,
    eval_every: int = 0,
    desc: str = "distill",
) -> TrainResult:
    """Train `student` in place for `steps` optimizer steps on rows of `batches` (N x L token ids).

    Micro-batches of `batch_size` rows are drawn in a seeded shuffled order, epoch after epoch;
    `grad_accum` of them make one optimizer step. AdamW over the parameters with requires_grad,
    linear warmup then `schedule` decay ("cosine" or "linear") to zero, gradient clipping at
    `max_grad_norm` (0 = off). Leaves the student in eval mode.

    With `save_every` > 0 the state is saved into `state_dir` every `save_every` optimizer steps
    and at the end. If `state_dir` already holds a state, the run continues from it, and ends as
    an uninterrupted run would; a state saved with other settings is refused.

    `mixed_precision` is "no", "bf16" or "fp16" (fp16 needs a GPU). `gradient_checkpointing`
    turns activation checkpointing on for the student (or its first submodule that supports it)
    during the run only. `eval_fn(student) -> float` runs in eval mode under torch.no_grad on every
    process, before the first step, every `eval_every` steps (0 = not in between) and after the
    last; it leaves the training RNG alone, so it does not change the run. `desc` names the
    progress bar and the log lines.
    """
    from accelerate.utils import set_seed

    _check_options(batches, steps=steps, batch_size=batch_size, grad_accum=grad_accum, state_dir=state_dir,
                   save_every=save_every, eval_fn=eval_fn, eval_every=eval_every, mixed_precision=mixed_precision)
    named = {n: p for n, p in student.named_parameters() if p.requires_grad}
    params = list(named.values())
    if not params:
        raise LlmshrinkError("distill: the model has no trainable parameters")

    set_seed(seed)
    dev = torch.device(device) if device is not None else None
    accelerator = _accelerator(dev is not None and dev.type == "cpu", mixed_precision, grad_accum)
    optimizer, scheduler = _optimizer(params, lr=lr, weight_decay=weight_decay, schedule=schedule,
                                      warmup_steps=warmup_steps, steps=steps)
    loader = _loader(batches, batch_size, seed)
    root = Path(state_dir) if state_dir is not None else None
    settings: dict = {}
    if root is not None:
        settings = run_settings(batches, named, accelerator.num_processes, steps=steps, batch_size=batch_size,
                                grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                schedule=schedule, max_grad_norm=max_grad_norm, seed=seed,
                                mixed_precision=mixed_precision)
    saved, meta = resume_point(root, settings)
    if saved is not None:
        load_trainable(saved, named)  # before prepare, so data-parallel wrappers start from it
    model, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    if saved is not None:
        load_optim(saved, optimizer, scheduler, accelerator)
        load_rng(saved, accelerator)
        log(f"{desc}: resuming from step {meta['step']} of {steps} ({saved})")
    frozen = FrozenTeacher(teacher.to(accelerator.device)) if teacher is not None else None

    model.train()
    losses: list[float] = list(meta["losses"])
    step_tokens: list[int] = list(meta["step_tokens"])
    evals = [(int(s), int(t), float(v)) for s, t, v in meta["evals"]]
    step_loss, micro, tokens = 0.0, 0, int(meta["tokens"])
    epoch, skip = int(meta["epoch"]), int(meta["index"])
    parts: dict = dict(meta["last_parts"])
    bar = _progress_bar(steps, len(losses), desc, accelerator)
    log_every = max(1, steps // 10)
    start, start_tokens, eval_seconds = time.perf_counter(), tokens, 0.0

    def maybe_eval() -> None:
        nonlocal eval_seconds
        step = len(losses)
        due = step == 0 or step == steps or (eval_every and step % eval_every == 0)
        if eval_fn is None or not due or (evals and evals[-1][0] >= step):  # already done before a resume
            return
        began = time.perf_counter()
        evals.append((step, tokens, _evaluate(eval_fn, model, accelerator)))
        eval_seconds += time.perf_counter() - began
        if accelerator.is_main_process:
            log(f"{desc}: step {step}/{steps} eval {evals[-1][2]:.4f}")

    restore_checkpointing = None
    try:
        if gradient_checkpointing:
            restore_checkpointing = _enable_checkpointing(student)
        maybe_eval()  # step 0; or the end, when rerunning a finished run whose state has no evals
        while len(losses) < steps:
            loader.set_epoch(epoch)
            for index, (input_ids,) in enumerate(loader, 1):
                if index <= skip:
                    continue  # replay the epoch's order up to the saved position
                loss, parts = _micro_step(accelerator, model, optimizer, input_ids, loss_fn=loss_fn, teacher=frozen,
                                          params=params, max_grad_norm=max_grad_norm,
                                          desc=desc, step=len(losses) + 1, lr=lr)
                step_loss += loss.item()
                micro += 1
                tokens += input_ids.numel() * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                # Mean over processes too: the history is the global batch's, the same on every
                # process, so the main process's snapshot restores it everywhere.
                mean = torch.tensor(step_loss / micro, device=accelerator.device)
                losses.append(accelerator.reduce(mean, "mean").item() if accelerator.num_processes > 1 else mean.item())
                step_tokens.append(tokens)
                step_loss, micro = 0.0, 0
                maybe_eval()
                rate = (tokens - start_tokens) / max(time.perf_counter() - start - eval_seconds, 1e-9)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                if bar.disable and (len(losses) % log_every == 0 or len(losses) == steps):
                    log(f"{desc}: step {len(losses)}/{steps} loss {losses[-1]:.4f} ({rate:.0f} tokens/s)")
                if root is not None and save_every and (len(losses) % save_every == 0 or len(losses) == steps):
                    meta = {"settings": settings, "step": len(losses), "epoch": epoch, "index": index,
                            "tokens": tokens, "losses": losses, "step_tokens": step_tokens, "evals": evals,
                            "last_parts": {k: float(v) for k, v in parts.items()}}
                    save_state(root, meta, named, optimizer, scheduler, accelerator)
                if len(losses) == steps:
                    break
            else:
                epoch, skip = epoch + 1, 0
    finally:
        bar.close()
        if restore_checkpointing is not None:
            restore_checkpointing()
        # Drops the autocast wrapper that mixed precision put around the student's forward.
        accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    seconds = time.perf_counter() - start - eval_seconds
    return TrainResult(
        steps=len(losses),
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=(tokens - start_tokens) / max(seconds, 1e-9),
        losses=losses,
        first_loss=losses[0],
        last_loss=losses[-1],
        last_parts={k: float(v) for k, v in parts.items()},
        step_tokens=step_tokens,
        evals=evals,
    )


def _check_options(batches: torch.Tensor, *, steps: int, batch_size: int, grad_accum: int, state_dir, save_every: int,
                   eval_fn, eval_every: int, mixed_precision: str) -> None:
    if steps < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"steps, batch_size and grad_accum must be >= 1, got {steps}, {batch_size}, {grad_accum}")
    if save_every < 0 or (save_every and state_dir is None):
        raise ValueError(f"save_every must be >= 0 and needs a state_dir, got {save_every}, {state_dir}")
    if eval_every < 0 or (eval_every and eval_fn is None):
        raise ValueError(f"eval_every must be >= 0 and needs an eval_fn, got {eval_every}, {eval_fn}")
    if mixed_precision not in PRECISIONS:
        allowed = ", ".join(repr(p) for p in PRECISIONS)
        raise LlmshrinkError(f"distill: mixed_precision must be one of {allowed}, got {mixed_precision!r}")
    if batches.ndim != 2 or batches.shape[0] == 0:
        raise LlmshrinkError(f"distill: expected a non-empty (blocks, seq_len) batch tensor, got {tuple(batches.shape)}")


def _optimizer(params: list[nn.Parameter], *, lr: float, weight_decay: float, schedule: str, warmup_steps: int,
               steps: int):
    """AdamW and its learning-rate schedule (stepped by hand, once per optimizer step)."""
    from transformers import get_scheduler

    # No decay on biases and norm weights (1-D), as usual for transformers.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=min(warmup_steps, steps), num_training_steps=steps)
    return optimizer, scheduler


def _loader(batches: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(
        TensorDataset(batches.long()),
        batch_size=batch_size,
        sampler=EpochShuffle(batches.shape[0], seed),
        # Only seeds worker processes; set so that starting an epoch leaves the global RNG alone.
        generator=torch.Generator().manual_seed(seed),
    )


def _micro_step(accelerator, model: nn.Module, optimizer, input_ids: torch.Tensor, *, loss_fn: LossFn,
                teacher: nn.Module | None, params: list[nn.Parameter], max_grad_norm: float,
                desc: str, step: int, lr: float) -> tuple[torch.Tensor, dict]:
    """Forward and backward one micro-batch of optimizer step `step`; the optimizer steps only when
    accelerate syncs the gradients (every grad_accum micro-batches)."""
    with accelerator.accumulate(model):
        with accelerator.autocast():  # the loss and teacher too, not only the student's forward
            loss, parts = loss_fn(model, teacher, input_ids)
        if not torch.isfinite(loss):
            raise LlmshrinkError(f"{desc}: loss became {loss.item()} at step {step}: lower lr (now {lr})")
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, parts


def _evaluate(eval_fn: Callable[[nn.Module], float], model: nn.Module, accelerator) -> float:
    """eval_fn on the unwrapped student in eval mode, without touching the training RNG."""
    rng = get_rng(accelerator.device)
    unwrapped = accelerator.unwrap_model(model).eval()
    with torch.no_grad():
        value = float(eval_fn(unwrapped))
    model.train()
    set_rng(rng, accelerator.device)  # evaluating must not change the training run
    return value


def _progress_bar(steps: int, done: int, desc: str, accelerator) -> tqdm:
    # disable=None: off when not a TTY (the loop then logs lines instead); off on all but one process per machine.
    return tqdm(total=steps, initial=done, desc=desc, unit="step", mininterval=1.0,
                disable=None if accelerator.is_local_main_process else True)


def _accelerator(cpu: bool, mixed_precision: str, grad_accum: int):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradientAccumulationPlugin

    # accelerate keeps one process-wide state and refuses another precision in it; each train()
    # call owns its settings, so that state starts over (the process group, in PartialState, stays).
    # accelerate has no public way to do this: `AcceleratorState._shared_state` (a dict, holding
    # "_mixed_precision") and `_reset_state()` are private (accelerate 1.x), and
    # tests/test_private_apis.py fails loudly if they change.
    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        # Exact step counts: sync every grad_accum micro-batches, also across epoch ends; the
        # scheduler is stepped by hand once per optimizer step, whatever the process count.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum, sync_with_dataloader=False, adjust_scheduler=False
        ),
    )
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        AcceleratorState._reset_state()
        # accelerate would silently train in fp32 here (no fp16 autocast or grad scaler on CPU).
        raise LlmshrinkError(
            "distill: mixed_precision='fp16' needs a GPU, this run is on CPU: use mixed_precision 'no' or 'bf16'"
        )
    return accelerator


def _enable_checkpointing(student: nn.Module) -> Callable[[], None]:
    """Turn activation checkpointing on; returns the function that restores the previous setting."""
    # The student first, then e.g. the model inside a wrapper; the transformers 5 name first.
    found = next(((m, name) for m in student.modules() for name in ("activation_checkpointing", "gradient_checkpointing")
                  if callable(getattr(m, f"{name}_enable", None)) and callable(getattr(m, f"{name}_disable", None))),
                 None)
    if found is None:
        raise LlmshrinkError(
            f"distill: gradient_checkpointing is on, but {type(student).__name__} and its submodules have no "
            "gradient_checkpointing_enable(): turn it off for this model"
        )
    module, name = found
    if getattr(module, f"is_{name}", False):
        return lambda: None  # the caller turned it on and keeps it
    had_input_hooks = bool(getattr(module, "_require_grads_hooks", None))
    getattr(module, f"{name}_enable")()

    def restore() -> None:
        getattr(module, f"{name}_disable")()
        # Enabling also made the embedding outputs require grad (for frozen embeddings); undo that.
        if not had_input_hooks and hasattr(module, "disable_input_require_grads"):
            module.disable_input_require_grads()

    return restore
