"""Data parallel: two CPU processes (gloo) train one student; their replicas stay identical."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import tiny_gpt2

from llmshrink.distill.trainer import train

STEPS = 3


def ce_loss(student, teacher, input_ids):
    logits = student(input_ids=input_ids, use_cache=False).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    return ce, {"ce": ce.detach()}


def blocks() -> torch.Tensor:
    return torch.randint(2, 40, (16, 32), generator=torch.Generator().manual_seed(0))


def worker(out_dir: str) -> None:
    """Runs in each launched process (module level, so the launcher can hand it over)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # The fork copies the parent's accelerate singletons (set up by earlier tests in this pytest
    # process); start from none, then let Accelerator(cpu=True) set up the gloo process group state
    # before anything creates a plain PartialState().
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.state
    seen: list[torch.Tensor] = []

    def loss_fn(student, teacher, input_ids):
        seen.append(input_ids.clone())
        return ce_loss(student, teacher, input_ids)

    student = tiny_gpt2(seed=1)
    result = train(student, blocks(), loss_fn, steps=STEPS, lr=3e-3, batch_size=2, seed=3, device="cpu",
                   log=lambda _: None)
    torch.save({"state": student.state_dict(), "tokens": result.tokens, "losses": result.losses,
                "processes": accelerator.num_processes, "seen": torch.stack(seen)},
               Path(out_dir) / f"rank-{accelerator.process_index}.pt")


def test_two_processes_train_identical_replicas_on_different_data(tmp_path):
    from accelerate import debug_launcher

    # First, so the forked workers inherit warm imports (importing transformers twice in parallel
    # takes most of this test's time otherwise).
    single = train(tiny_gpt2(seed=1), blocks(), ce_loss, steps=STEPS, lr=3e-3, batch_size=2, seed=3,
                   device="cpu", log=lambda _: None)
    debug_launcher(worker, args=(str(tmp_path),), num_processes=2)
    ranks = [torch.load(tmp_path / f"rank-{i}.pt", weights_only=True) for i in range(2)]
    assert [r["processes"] for r in ranks] == [2, 2]
    assert not torch.equal(ranks[0]["seen"], ranks[1]["seen"])  # each process had its own shard...
    initial = tiny_gpt2(seed=1).state_dict()
    moved = 0
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name  # ...yet gradients were averaged
        moved += not torch.equal(value, initial[name])
    assert moved > 10  # it trained
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the global history, reduced over processes

    # Twice the tokens of a single process for the same steps: a global batch of 2 x batch_size.
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == 2 * single.tokens == 2 * STEPS * 2 * 32
