"""`llmshrink apply` killed with SIGKILL in each phase (a pass, distillation with save_every, evaluation, save)
leaves no output folder and no temporary file outside its work folder; the rerun resumes training where it
was saved, ends with an uninterrupted run's losses, and writes a checkpoint that reloads exactly.

Each phase is hit by watching the run: its progress lines on stdout (unbuffered), and for the save the
temporary output folder appearing under the work folder. One run is killed per phase, each rerunning the
previous one's recipe in the same output folder, so the chain also tests resuming after every kind of kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmshrink
from llmshrink.engine import STAGING_DIR, work_dir_for

STEPS, SAVE_EVERY = 12, 3
RUNNING: list[Run] = []


@pytest.fixture(autouse=True)
def no_run_survives():
    yield
    for run in RUNNING:  # a failed assertion must not leave an apply running
        run.kill()
        run.proc.wait()
    RUNNING.clear()


def recipe_text(model_dir: Path, text: Path, out: Path) -> str:
    return f"""\
name: tiny-kill
model: {{id: {model_dir}}}
data: {{source: {text}}}
stages:
  - kronecker: {{targets: 'model\\.layers\\.\\d+\\.mlp\\..*', a_shape: [16, 8]}}
  - distill: {{steps: {STEPS}, save_every: {SAVE_EVERY}, batch_size: 2, seq_len: 32, warmup_steps: 1, lr: 1.0e-3}}
evaluate:
  perplexity: {{data: {{source: {text}, max_tokens: 300}}, window: 32, stride: 16}}
  latency: {{prompt_tokens: 4, new_tokens: 4, repeats: 1}}
  macs: false
  memory: false
  after_each_stage: false
output: {{dir: {out}}}
"""


class Run:
    """`llmshrink apply` in its own process group; `kill()` sends SIGKILL to the group (no cleanup runs)."""

    def __init__(self, recipe: Path, tmpdir: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.stderr = open(tmpdir.parent / f"{recipe.stem}.stderr", "ab")  # progress bars: not piped, never block
        self.proc = subprocess.Popen([sys.executable, "-m", "llmshrink", "apply", str(recipe)], env=env,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.guard = threading.Timer(300, self.kill)  # a hung run fails the test instead of hanging it
        self.guard.daemon = True
        self.guard.start()
        RUNNING.append(self)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill_at_line(self, startswith: str) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(startswith):
                self.kill()
                return
        raise AssertionError(f"the run ended before printing {startswith!r}:\n{self.text}")

    def kill_when_exists(self, path: Path) -> None:
        while not path.exists():
            assert self.proc.poll() is None, f"the run ended before {path} appeared"
            time.sleep(0.005)
        self.kill()

    def finish(self) -> int:
        self.lines += self.proc.stdout.readlines()
        code = self.proc.wait()
        self.guard.cancel()
        self.stderr.close()
        return code

    @property
    def text(self) -> str:
        return "".join(self.lines)


def assert_nothing_outside_work_folder(runs: Path, out: Path, tmpdir: Path) -> None:
    assert not out.exists()
    assert [p.name for p in runs.iterdir()] in ([], [work_dir_for(out).name])
    assert [p for p in tmpdir.rglob("*") if "llmshrink" in p.name or p.suffix in (".safetensors", ".tmp")] == []


def test_apply_killed_in_every_phase_leaves_no_output_and_resumes(tmp_path, tiny_llama_dir, tiny_text):
    tmpdir = tmp_path / "systmp"  # the runs' system temp dir
    tmpdir.mkdir()
    runs, reference = tmp_path / "runs", tmp_path / "reference"
    out, ref_out = runs / "out", reference / "out"
    runs.mkdir()
    recipe, ref_recipe = tmp_path / "kill.yaml", tmp_path / "reference.yaml"
    recipe.write_text(recipe_text(tiny_llama_dir, tiny_text, out))
    ref_recipe.write_text(recipe_text(tiny_llama_dir, tiny_text, ref_out))
    uninterrupted = Run(ref_recipe, tmpdir)  # alongside the killed runs (2 cores)
    work = work_dir_for(out)

    # 1. During a pass: kronecker has factored its first layer of six.
    run = Run(recipe, tmpdir)
    run.kill_at_line("  model.layers.0.mlp.gate_proj:")
    assert run.finish() == -signal.SIGKILL and "[3/7]" not in run.text
    assert_nothing_outside_work_folder(runs, out, tmpdir)

    # 2. During distillation, after the snapshot of step 3 and before the one of step 6.
    run = Run(recipe, tmpdir)
    run.kill_at_line(f"distill: step 5/{STEPS}")
    assert run.finish() == -signal.SIGKILL and "[4/7]" not in run.text
    assert_nothing_outside_work_folder(runs, out, tmpdir)
    snapshots = [p.name for p in (work / "stage-1-distill").iterdir() if p.name.startswith("step-")]
    assert snapshots == [f"step-{SAVE_EVERY:08d}"], snapshots

    # 3. During evaluation; this run resumed the distillation at the saved step and finished it.
    run = Run(recipe, tmpdir)
    run.kill_at_line("[4/7] evaluate base model")
    assert run.finish() == -signal.SIGKILL and "[6/7]" not in run.text
    assert f"distill: resuming from step {SAVE_EVERY} of {STEPS}" in run.text
    assert f"distill: step {SAVE_EVERY}/{STEPS}" not in run.text  # did not train those steps again
    assert_nothing_outside_work_folder(runs, out, tmpdir)

    # 4. During save: the checkpoint is being written (and checked) in the work folder.
    run = Run(recipe, tmpdir)
    run.kill_when_exists(work / STAGING_DIR)
    assert run.finish() == -signal.SIGKILL and "[6/7] save" in run.text and "saved" not in run.text
    assert_nothing_outside_work_folder(runs, out, tmpdir)
    assert (work / STAGING_DIR).is_dir()  # the half-written output stays inside the work folder

    # 5. The rerun completes: the distillation is restored from its last snapshot, the leftovers are gone.
    run = Run(recipe, tmpdir)
    assert run.finish() == 0, run.text
    assert f"distill: resuming from step {STEPS} of {STEPS}" in run.text
    assert [p.name for p in runs.iterdir()] == ["out"]
    assert [p for p in tmpdir.rglob("*") if "llmshrink" in p.name] == []
    assert uninterrupted.finish() == 0, uninterrupted.text

    manifest = json.loads((out / "llmshrink.json").read_text())
    ref_manifest = json.loads((ref_out / "llmshrink.json").read_text())
    assert manifest["checks"]["reload_max_abs_logit_diff"] == 0.0
    curve, ref_curve = manifest["passes"][1]["record"]["curve"], ref_manifest["passes"][1]["record"]["curve"]
    assert len(curve["loss"]) == STEPS
    assert curve["loss"] == pytest.approx(ref_curve["loss"], abs=1e-5)

    # The checkpoint reloads exactly: llmshrink.load holds the saved tensors, and computes the reference's logits.
    model, ref_model = llmshrink.load(out), llmshrink.load(ref_out)
    saved = load_file(out / "model.safetensors")
    state = model.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    ids = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=0, atol=1e-5)
