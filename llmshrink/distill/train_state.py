"""The resumable state of a training run: what `distill.trainer.train` snapshots and continues from.

A snapshot lives in `state_dir/step-<k>/` (written as `.tmp-step-<k>/`, then renamed, so a crash never
leaves a half snapshot; only the newest is kept):

- `state.json`: the run settings (`run_settings`; a rerun with other settings is refused), the step, the
  data position (epoch, index into the `EpochShuffle` order), the token count, the losses, the
  evaluations and the last loss parts (`new_meta` lists the keys);
- `trainable.safetensors`: the trainable parameters only (frozen ones never change);
- `optim.pt`: optimizer, scheduler and fp16 grad-scaler state dicts;
- `rng-<process>.pt`: each process's torch / CUDA / python / numpy RNG states.

Plain state dicts rather than accelerator.save_state: that writes the whole model every time, needs the
scheduler prepared (the loop steps it by hand, once per optimizer step), restores no data position for
our sampler and records no settings to check a rerun against.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Sampler

from llmshrink.errors import LlmshrinkError


class EpochShuffle(Sampler[int]):
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


def new_meta() -> dict:
    """The state.json contents of a run that has not started (less the settings)."""
    return {"step": 0, "epoch": 0, "index": 0, "tokens": 0, "losses": [], "last_parts": {},
            "step_tokens": [], "evals": []}


def run_settings(batches: torch.Tensor, named: dict[str, nn.Parameter], processes: int, **hparams) -> dict:
    """What a saved state must agree on with the call that resumes it (JSON-normalised)."""
    digest = hashlib.blake2b(batches.detach().cpu().contiguous().numpy().data, digest_size=8).hexdigest()
    return json.loads(json.dumps({
        **hparams,
        "processes": processes,
        "data_shape": list(batches.shape),
        "data_hash": digest,
        "trainable": [f"{n} {list(p.shape)}" for n, p in named.items()],
    }))


def latest_state(root: Path) -> Path | None:
    """The newest complete snapshot in `root`, or None."""
    # Complete snapshots only: a crash mid-save leaves a .tmp-* directory, which is ignored.
    snaps = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return snaps[-1] if snaps else None


def resume_point(root: Path | None, settings: dict) -> tuple[Path | None, dict]:
    """(newest snapshot in `root`, its state.json), or (None, new_meta()) where there is none or no `root`."""
    saved = latest_state(root) if root is not None else None
    return saved, load_meta(saved, settings) if saved is not None else new_meta()


def load_meta(path: Path, settings: dict) -> dict:
    """The snapshot's state.json; refused in one line if it was saved with other `settings`."""
    meta = json.loads((path / "state.json").read_text())
    diff = first_difference(meta["settings"], settings)
    if diff is not None:
        key, old, new = diff
        raise LlmshrinkError(
            f"distill: {path} was saved with {key}={old}, this run has {key}={new}: "
            "resume with the same settings, or use another state dir"
        )
    return meta


def first_difference(saved: dict, now: dict) -> tuple[str, object, object] | None:
    """(key, saved value, new value) of the first setting that differs, or None."""
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


def load_trainable(path: Path, named: dict[str, nn.Parameter]) -> None:
    """Copy the snapshot's trainable parameters into `named`, in place."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(tensors[name])


def load_optim(path: Path, optimizer, scheduler, accelerator) -> None:
    """Restore the optimizer, scheduler and (fp16) grad-scaler states."""
    # The accelerate optimizer wrapper hands state dicts through to the torch optimizer, which
    # moves the moments onto each parameter's device.
    state = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])


def load_rng(path: Path, accelerator) -> None:
    """Restore this process's RNG states from the snapshot."""
    set_rng(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True), accelerator.device)


def save_state(root: Path, meta: dict, named: dict[str, nn.Parameter], optimizer, scheduler, accelerator) -> None:
    """Write the snapshot `root/step-<meta["step"]>/` atomically and drop the older ones (all processes call it)."""
    from safetensors.torch import save_file

    final, tmp = root / f"step-{meta['step']:08d}", root / f".tmp-step-{meta['step']:08d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(get_rng(accelerator.device), tmp / f"rng-{accelerator.process_index}.pt")  # per process
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


def get_rng(device: torch.device) -> dict:
    """The torch, CUDA (on a CUDA `device`), python and numpy RNG states, as torch.load(weights_only) can read."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def set_rng(state: dict, device: torch.device) -> None:
    """Restore what `get_rng` returned."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
