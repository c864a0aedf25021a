"""The training loop every distillation schedule shares, built on accelerate.

The loss is a callable `loss_fn(student, teacher, input_ids) -> (loss, parts)`, so hidden-state
losses or layer-by-layer schedules only swap the callable (and which parameters are trainable).
The teacher handed to it is frozen: it runs in eval mode under torch.no_grad.

Options: `mixed_precision` ("no", "bf16", or "fp16" on GPUs only) runs the loss under accelerate's
autocast; `gradient_checkpointing` recomputes activations in the backward pass (less memory, same
numbers); `eval_fn` is called on the student at step 0, every `eval_every` steps and at the end, and
its values are recorded in `TrainResult.evals`.

Resume: with `state_dir` and `save_every`, the loop snapshots its state into
`state_dir/step-<k>/` (written as `.tmp-step-<k>/`, then renamed, so a crash never leaves a half
snapshot; only the newest is kept): `state.json` (run settings, step, data position, token count,
losses, evaluations), `trainable.safetensors` (the trainable parameters only; frozen ones never change),
`optim.pt` (optimizer, scheduler and fp16 grad-scaler state dicts) and `rng-<process>.pt`. Plain
state dicts rather than accelerator.save_state: that writes the whole model every time, needs the
scheduler prepared (this loop steps it by hand, once per optimizer step), restores no data position
for our sampler and records no settings to check a rerun against.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from tqdm.auto import tqdm

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
    from transformers import get_scheduler

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
    named = {n: p for n, p in student.named_parameters() if p.requires_grad}
    params = list(named.values())
    if not params:
        raise LlmshrinkError("distill: the model has no trainable parameters")

    set_seed(seed)
    dev = torch.device(device) if device is not None else None
    accelerator = _accelerator(dev is not None and dev.type == "cpu", mixed_precision, grad_accum)
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
        sampler=_EpochShuffle(batches.shape[0], seed),
        # Only seeds worker processes; set so that starting an epoch leaves the global RNG alone.
        generator=torch.Generator().manual_seed(seed),
    )
    root = Path(state_dir) if state_dir is not None else None
    settings: dict = {}
    saved = None
    if root is not None:
        settings = _settings(batches, named, accelerator.num_processes, steps=steps, batch_size=batch_size,
                             grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                             schedule=schedule, max_grad_norm=max_grad_norm, seed=seed,
                             mixed_precision=mixed_precision)
        saved = _latest_state(root)
    meta: dict = {"step": 0, "epoch": 0, "index": 0, "tokens": 0, "losses": [], "last_parts": {},
                  "step_tokens": [], "evals": []}
    if saved is not None:
        meta = _load_meta(saved, settings)
        _load_trainable(saved, named)  # before prepare, so data-parallel wrappers start from it
    model, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    if saved is not None:
        _load_optim(saved, optimizer, scheduler, accelerator)
        _set_rng(torch.load(saved / f"rng-{accelerator.process_index}.pt", weights_only=True), accelerator.device)
        log(f"{desc}: resuming from step {meta['step']} of {steps} ({saved})")
    frozen = FrozenTeacher(teacher.to(accelerator.device)) if teacher is not None else None

    model.train()
    losses: list[float] = list(meta["losses"])
    step_tokens: list[int] = list(meta["step_tokens"])
    evals = [(int(s), int(t), float(v)) for s, t, v in meta["evals"]]
    step_loss, micro, tokens = 0.0, 0, int(meta["tokens"])
    epoch, skip = int(meta["epoch"]), int(meta["index"])
    parts: dict = dict(meta["last_parts"])
    bar = tqdm(
        total=steps,
        initial=len(losses),
        desc=desc,
        unit="step",
        mininterval=1.0,
        disable=None if accelerator.is_local_main_process else True,  # None: off when not a TTY
    )
    log_every = max(1, steps // 10)
    start, start_tokens, eval_seconds = time.perf_counter(), tokens, 0.0

    def maybe_eval() -> None:
        nonlocal eval_seconds
        step = len(losses)
        due = step == 0 or step == steps or (eval_every and step % eval_every == 0)
        if eval_fn is None or not due or (evals and evals[-1][0] >= step):  # already done before a resume
            return
        began, rng = time.perf_counter(), _get_rng(accelerator.device)
        unwrapped = accelerator.unwrap_model(model).eval()
        with torch.no_grad():
            value = float(eval_fn(unwrapped))
        model.train()
        _set_rng(rng, accelerator.device)  # evaluating must not change the training run
        evals.append((step, tokens, value))
        eval_seconds += time.perf_counter() - began
        if accelerator.is_main_process:
            log(f"{desc}: step {step}/{steps} eval {value:.4f}")

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
                with accelerator.accumulate(model):
                    with accelerator.autocast():  # the loss and teacher too, not only the student's forward
                        loss, parts = loss_fn(model, frozen, input_ids)
                    if not torch.isfinite(loss):
                        raise LlmshrinkError(
                            f"{desc}: loss became {loss.item()} at step {len(losses) + 1}: lower lr (now {lr})"
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
                    _save_state(root, meta, named, optimizer, scheduler, accelerator)
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


def _accelerator(cpu: bool, mixed_precision: str, grad_accum: int):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradientAccumulationPlugin

    # accelerate keeps one process-wide state and refuses another precision in it; each train()
    # call owns its settings, so that state starts over (the process group, in PartialState, stays).
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


class _EpochShuffle(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch), so (epoch, index) is a data position."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by accelerate's loader at each epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return iter(torch.randperm(self.n, generator=generator).tolist())


# --- resume state ---------------------------------------------------------------------------------


def _settings(batches: torch.Tensor, named: dict[str, nn.Parameter], processes: int, **hparams) -> dict:
    """What a saved state must agree on with the call that resumes it (JSON-normalised)."""
    digest = hashlib.blake2b(batches.detach().cpu().contiguous().numpy().data, digest_size=8).hexdigest()
    return json.loads(json.dumps({
        **hparams,
        "processes": processes,
        "data_shape": list(batches.shape),
        "data_hash": digest,
        "trainable": [f"{n} {list(p.shape)}" for n, p in named.items()],
    }))


def _latest_state(root: Path) -> Path | None:
    # Complete snapshots only: a crash mid-save leaves a .tmp-* directory, which is ignored.
    snaps = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return snaps[-1] if snaps else None


def _load_meta(path: Path, settings: dict) -> dict:
    meta = json.loads((path / "state.json").read_text())
    diff = _first_difference(meta["settings"], settings)
    if diff is not None:
        key, old, new = diff
        raise LlmshrinkError(
            f"distill: {path} was saved with {key}={old}, this run has {key}={new}: "
            "resume with the same settings, or use another state dir"
        )
    return meta


def _first_difference(saved: dict, now: dict) -> tuple[str, object, object] | None:
    for key, new in now.items():
        old = saved.get(key)
        if old == new:
            continue
        if key != "trainable":
            return key, old, new
        old = old or []  # name the first parameter that differs, not the whole list
        i = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
        return f"trainable[{i}]", old[i] if i < len(old) else "none", new[i] if i < len(new) else "none"
    return None


def _load_trainable(path: Path, named: dict[str, nn.Parameter]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(tensors[name])


def _load_optim(path: Path, optimizer, scheduler, accelerator) -> None:
    # The accelerate optimizer wrapper hands state dicts through to the torch optimizer, which
    # moves the moments onto each parameter's device.
    state = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])


def _save_state(root: Path, meta: dict, named: dict[str, nn.Parameter], optimizer, scheduler, accelerator) -> None:
    from safetensors.torch import save_file

    final, tmp = root / f"step-{meta['step']:08d}", root / f".tmp-step-{meta['step']:08d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_get_rng(accelerator.device), tmp / f"rng-{accelerator.process_index}.pt")  # per process
    if main:  # data-parallel replicas hold the same weights and optimizer state
        save_file({n: p.detach().cpu().contiguous() for n, p in named.items()}, str(tmp / "trainable.safetensors"))
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler},
                   tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(meta))
    accelerator.wait_for_everyone()
    if main:
        for f in tmp.iterdir():  # on disk before the rename publishes the snapshot
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in root.iterdir():
            if old != final and old.name.startswith(("step-", ".tmp-step-")):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _get_rng(device: torch.device) -> dict:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def _set_rng(state: dict, device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
