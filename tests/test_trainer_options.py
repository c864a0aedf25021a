"""Trainer options: mixed precision, gradient checkpointing, periodic evaluation (also across a resume), plots."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from torch import nn

from llmshrink.distill.trainer import train
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.plots import Panel, save_curves_png


def ce_loss(student, teacher, input_ids):
    logits = student(input_ids=input_ids, use_cache=False).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    return ce, {"ce": ce.detach()}


@pytest.fixture
def blocks():
    # Tokens from a 38-word slice of the 128 vocab: the unigram statistics alone make the loss drop.
    return torch.randint(2, 40, (10, 32), generator=torch.Generator().manual_seed(0))


def held_out_ce(model) -> float:
    ids = torch.randint(2, 40, (2, 32), generator=torch.Generator().manual_seed(1))
    return ce_loss(model, None, ids)[0].item()


def run(student, blocks, **overrides):
    kwargs = dict(steps=6, lr=3e-3, batch_size=2, seed=3, device="cpu", log=lambda line: None)
    return train(student, blocks, ce_loss, **{**kwargs, **overrides})


def test_bf16_on_cpu_trains_and_fp16_is_refused(blocks):
    student = tiny_gpt2(seed=1)
    result = run(student, blocks, steps=8, mixed_precision="bf16")
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.last_loss < result.first_loss - 0.3, result.losses
    # The student comes back as it was: fp32 weights, no autocast wrapper left around forward.
    assert "_original_forward" not in vars(student)
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert run(tiny_gpt2(seed=1), blocks, steps=1).steps == 1  # another precision in the same process

    with pytest.raises(LlmshrinkError) as err:
        run(tiny_gpt2(seed=1), blocks, mixed_precision="fp16")
    assert str(err.value) == (
        "distill: mixed_precision='fp16' needs a GPU, this run is on CPU: use mixed_precision 'no' or 'bf16'"
    )
    with pytest.raises(LlmshrinkError, match=r"mixed_precision must be one of 'no', 'bf16', 'fp16', got 'fp32'"):
        run(tiny_gpt2(seed=1), blocks, mixed_precision="fp32")


def checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


class Wrapper(nn.Module):
    """A student wrapped the way feature distillation does it: the HF model is an attribute."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, **kwargs):
        return self.student(**kwargs)


def test_gradient_checkpointing_gives_the_same_weights_and_is_restored(blocks):
    seen: list[bool] = []

    def recording_loss(student, teacher, input_ids):
        seen.append(checkpointing_on(student))
        return ce_loss(student, teacher, input_ids)

    # Llama has no dropout, so recomputed activations are the same numbers.
    plain, wrapped = tiny_llama(seed=1), tiny_llama(seed=1)
    train(plain, blocks, recording_loss, steps=3, lr=3e-3, batch_size=2, seed=3, device="cpu", log=lambda _: None)
    assert seen == [False] * 3
    seen.clear()
    train(Wrapper(wrapped), blocks, recording_loss, steps=3, lr=3e-3, batch_size=2, seed=3, device="cpu",
          log=lambda _: None, gradient_checkpointing=True)
    assert seen == [True] * 3
    assert not checkpointing_on(wrapped) and not getattr(wrapped, "_require_grads_hooks", None)  # restored
    start = dict(tiny_llama(seed=1).named_parameters())
    for name, param in wrapped.named_parameters():
        torch.testing.assert_close(param, dict(plain.named_parameters())[name], rtol=0, atol=1e-5, msg=name)
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"], wrapped.model.layers[0].mlp.up_proj.weight)

    with pytest.raises(LlmshrinkError, match="Wrapper and its submodules have no gradient_checkpointing_enable"):
        linear = Wrapper(nn.Embedding(128, 8))
        train(linear, blocks, lambda s, t, x: (s.student(x).pow(2).mean(), {}), steps=1, device="cpu",
              log=lambda _: None, gradient_checkpointing=True)


def test_periodic_eval_is_recorded_and_does_not_change_the_run(blocks):
    calls: list[tuple[bool, bool]] = []

    def eval_fn(model) -> float:
        calls.append((model.training, torch.is_grad_enabled()))
        torch.rand(100)  # draws from the global RNG, which GPT-2's dropout also uses
        return held_out_ce(model)

    lines: list[str] = []
    student, reference = tiny_gpt2(seed=1), tiny_gpt2(seed=1)
    result = run(student, blocks, steps=5, eval_every=2, eval_fn=eval_fn, log=lines.append)
    assert [s for s, _, _ in result.evals] == [0, 2, 4, 5]
    assert calls == [(False, False)] * 4  # eval mode, no graph
    assert result.step_tokens == [2 * 32 * k for k in range(1, 6)] and result.tokens == result.step_tokens[-1]
    assert [t for _, t, _ in result.evals] == [0, *(result.step_tokens[s - 1] for s in (2, 4, 5))]
    assert result.evals[-1][2] < result.evals[0][2] - 0.3  # held-out loss fell
    assert result.evals[-1][2] == pytest.approx(held_out_ce(student), abs=1e-6)
    assert f"distill: step 5/5 eval {result.evals[-1][2]:.4f}" in lines

    # Dropout is on in training, yet evaluating leaves the RNG, and so the run, as it was.
    run(reference, blocks, steps=5)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(dict(student.named_parameters())[name], param, rtol=0, atol=0, msg=name)

    # The last step a multiple of eval_every: evaluated once.
    assert [s for s, _, _ in run(tiny_gpt2(seed=1), blocks, steps=4, eval_every=2, eval_fn=held_out_ce).evals] == [0, 2, 4]
    with pytest.raises(ValueError, match="needs an eval_fn"):
        run(tiny_gpt2(seed=1), blocks, eval_every=2)


class Crash(Exception):
    pass


def test_evals_and_step_tokens_survive_a_resume(blocks, tmp_path):
    def crash_after(n: int | None):
        calls = {"n": 0}

        def loss_fn(student, teacher, input_ids):
            calls["n"] += 1
            if calls["n"] == n:
                raise Crash
            return ce_loss(student, teacher, input_ids)

        return loss_fn

    evaluated: list[int] = []

    def eval_fn(model) -> float:
        evaluated.append(1)
        return held_out_ce(model)

    opts = dict(steps=6, lr=3e-3, batch_size=4, seed=3, device="cpu", log=lambda _: None, save_every=2,
                eval_fn=eval_fn, eval_every=2)
    full = train(tiny_gpt2(seed=1), blocks, crash_after(None), state_dir=tmp_path / "a", **opts)
    # 10 blocks in batches of 4: the last batch of an epoch has 2 rows, so step tokens are uneven.
    assert full.step_tokens == [128, 256, 320, 448, 576, 640]

    with pytest.raises(Crash):  # during step 5: the newest snapshot is step 4, already evaluated there
        train(tiny_gpt2(seed=1), blocks, crash_after(5), state_dir=tmp_path / "b", **opts)
    evaluated.clear()
    resumed = train(tiny_gpt2(seed=1), blocks, crash_after(None), state_dir=tmp_path / "b", **opts)
    assert len(evaluated) == 1  # step 6 only: steps 0, 2 and 4 came from the snapshot
    assert resumed.step_tokens == full.step_tokens
    assert [(s, t) for s, t, _ in resumed.evals] == [(s, t) for s, t, _ in full.evals] == [
        (0, 0), (2, 256), (4, 448), (6, 640)]
    assert [v for _, _, v in resumed.evals] == pytest.approx([v for _, _, v in full.evals], abs=1e-6)

    evaluated.clear()  # rerunning the finished run evaluates nothing again
    assert train(tiny_gpt2(seed=1), blocks, crash_after(None), state_dir=tmp_path / "a", **opts).evals == full.evals
    assert evaluated == []


def test_save_curves_png(tmp_path):
    path = tmp_path / "plots" / "curves.png"
    panels = [
        Panel("loss", "step", "loss", {"train": ([1, 2, 3], [3.0, 2.0, 1.5])}, log_y=True),
        Panel("eval", "tokens", "ce", {"a": ([0, 100], [4.0, 3.0]), "b": ([0, 100], [4.2, 3.5])}),
    ]
    assert save_curves_png(path, panels) == path
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temp file left behind

    with pytest.raises(ValueError, match="plots: panel 'empty' has no series to draw"):
        save_curves_png(tmp_path / "empty.png", [Panel("empty", "x", "y", {})])
    with pytest.raises(ValueError, match="has 2 x and 1 y values"):
        save_curves_png(tmp_path / "bad.png", [Panel("p", "x", "y", {"s": ([1, 2], [1.0])})])
    assert not (tmp_path / "empty.png").exists()
