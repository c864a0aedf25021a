"""Resume: a distillation run killed after k steps and rerun ends where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_tokenizer

from llmshrink.distill.data import pack, token_ids
from llmshrink.distill.trainer import train
from llmshrink.errors import LlmshrinkError
from llmshrink.specs import DataSpec

STEPS = 12


def teacher_model():
    """A tiny GPT-2 unlike the student, with confident predictions so KD has something to learn."""
    teacher = tiny_gpt2(seed=2)
    with torch.no_grad():
        teacher.transformer.wte.weight.mul_(5.0)
    return teacher


def kd_ce_loss(student, teacher, input_ids):
    # Own loss (not the pass's) so this test only exercises the loop; dropout in the student
    # (GPT-2 default 0.1) makes the result depend on the restored RNG state too.
    logits = student(input_ids=input_ids, use_cache=False).logits[:, :-1]
    target = teacher(input_ids=input_ids, use_cache=False).logits[:, :-1]
    kd = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean")
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    return 0.5 * kd / input_ids.shape[1] + 0.5 * ce, {"ce": ce.detach()}


class CrashAfter:
    """Counts loss_fn calls; raises KeyboardInterrupt (a Ctrl-C) on call number `crash_at`."""

    def __init__(self, crash_at: int | None = None):
        self.crash_at, self.calls = crash_at, 0

    def __call__(self, student, teacher, input_ids):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        return kd_ce_loss(student, teacher, input_ids)


@pytest.fixture
def blocks(tiny_text):
    # 10 blocks, batch 2: 5 micro-batches an epoch, so with grad_accum 2 the 12 steps run over
    # ~5 epochs and optimizer steps straddle epoch ends (the saved data position is mid-epoch).
    return pack(token_ids(DataSpec(source=str(tiny_text)), tiny_tokenizer()), 32)[:10]


def run(blocks, state_dir, loss_fn, logs=None, student=None, **overrides):
    student = student if student is not None else tiny_gpt2(seed=1)
    kwargs = dict(steps=STEPS, lr=3e-3, warmup_steps=2, batch_size=2, grad_accum=2, seed=7, device="cpu",
                  teacher=teacher_model(), state_dir=state_dir, save_every=4)
    kwargs.update(overrides)
    log = (logs if logs is not None else []).append
    return student, train(student, blocks, loss_fn, log=log, **kwargs)


def test_killed_and_resumed_run_equals_uninterrupted_run(blocks, tmp_path):
    full_dir, crash_dir = tmp_path / "a", tmp_path / "b"
    model_a, result_a = run(blocks, full_dir, CrashAfter())
    assert [p.name for p in full_dir.iterdir()] == ["step-00000012"]  # only the newest snapshot kept

    # Ctrl-C during step 7 (micro-batch 13); the last snapshot is step 4, and no half-written one.
    crash = CrashAfter(crash_at=2 * 6 + 1)
    with pytest.raises(KeyboardInterrupt):
        run(blocks, crash_dir, crash)
    assert [p.name for p in crash_dir.iterdir()] == ["step-00000004"]

    # The identical call, on a freshly built student as after a restart, resumes from step 4.
    resumed, logs = CrashAfter(), []
    model_b, result_b = run(blocks, crash_dir, resumed, logs=logs)
    assert any(f"resuming from step 4 of {STEPS}" in line for line in logs), logs
    assert resumed.calls == 2 * (STEPS - 4)  # did not start over
    assert result_b.losses == pytest.approx(result_a.losses, abs=1e-6)
    assert result_b.steps == STEPS and result_b.tokens == result_a.tokens == STEPS * 2 * 2 * 32
    params_b = dict(model_b.named_parameters())
    for name, param in model_a.named_parameters():
        torch.testing.assert_close(params_b[name], param, rtol=0, atol=1e-6, msg=name)
    # The run did train: weights moved away from the initial student.
    start = dict(tiny_gpt2(seed=1).named_parameters())
    assert not torch.allclose(start["transformer.h.0.mlp.c_fc.weight"], params_b["transformer.h.0.mlp.c_fc.weight"])

    # Rerunning a finished run restores its end state without training again.
    again = CrashAfter()
    model_c, result_c = run(blocks, full_dir, again)
    assert again.calls == 0 and result_c.losses == result_a.losses
    torch.testing.assert_close(model_c.lm_head.weight, model_a.lm_head.weight, rtol=0, atol=0)


def test_resume_with_other_settings_is_refused_in_one_line(blocks, tmp_path):
    run(blocks, tmp_path, CrashAfter(), steps=4, save_every=2)
    with pytest.raises(LlmshrinkError) as err:
        run(blocks, tmp_path, CrashAfter(), steps=4, save_every=2, lr=1e-3)
    assert str(err.value) == (
        f"distill: {tmp_path / 'step-00000004'} was saved with lr=0.003, this run has lr=0.001: "
        "resume with the same settings, or use another state dir"
    )
    with pytest.raises(LlmshrinkError, match=r"saved with data_shape=\[10, 32\], this run has data_shape=\[9, 32\]"):
        run(blocks[:9], tmp_path, CrashAfter(), steps=4, save_every=2)
    # Freezing a parameter changes the trainable set: the message names the first that differs.
    student = tiny_gpt2(seed=1)
    student.transformer.wpe.weight.requires_grad_(False)
    with pytest.raises(LlmshrinkError) as err:
        run(blocks, tmp_path, CrashAfter(), student=student, steps=4, save_every=2)
    assert "trainable[1]=transformer.wpe.weight [128, 64], this run has trainable[1]=transformer.h.0" in str(err.value)
    assert "\n" not in str(err.value)


def test_without_state_dir_nothing_is_written(blocks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_writes(*args, **kwargs):
        raise AssertionError("train wrote a file without a state_dir")

    monkeypatch.setattr(torch, "save", no_writes)
    monkeypatch.setattr("safetensors.torch.save_file", no_writes)
    _, result = run(blocks, None, CrashAfter(), steps=3, save_every=0)
    assert result.steps == 3 and list(tmp_path.iterdir()) == [tmp_path / "text.txt"]  # the fixture's file only
    with pytest.raises(ValueError, match="needs a state_dir"):
        run(blocks, None, CrashAfter(), steps=3, save_every=2)
