"""`apply` publishes its output folder by one rename, once written and verified: a failed check leaves no
output (with overwrite: the old one, untouched) and no temporary file or folder anywhere."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

import llmshrink.engine as engine
from llmshrink.cli import main
from llmshrink.engine import PREVIOUS_DIR, STAGING_DIR, work_dir_for


def recipe_text(model_dir, text_file, out_dir) -> str:
    # Unmerged LoRA adapters: the adapter is written apart from the checkpoint first (a temporary folder).
    return f"""\
name: tiny-atomic
model: {{id: {model_dir}}}
data: {{source: {text_file}}}
stages:
  - low_rank: {{targets: '.*mlp\\.c_fc', rank: 8}}
  - lora: {{r: 4, alpha: 8, targets: '.*attn\\.c_attn', merge: false}}
  - distill: {{steps: 2, batch_size: 2, seq_len: 32, warmup_steps: 1, lr: 1.0e-2}}
evaluate:
  perplexity: {{data: {{source: {text_file}, max_tokens: 200}}, window: 32, stride: 16}}
  latency: {{prompt_tokens: 4, new_tokens: 2, repeats: 1}}
  macs: false
  memory: false
output: {{dir: {out_dir}, overwrite: true}}
"""


def test_overwrite_swaps_only_after_the_reload_check_passes(tmp_path, tiny_model_dir, tiny_text, monkeypatch):
    scratch = tmp_path / "systmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    runs = tmp_path / "runs"
    out = runs / "out"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("the previous checkpoint")
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe_text(tiny_model_dir, tiny_text, out))

    seen = {}
    real_verify = engine._verify

    def failing_verify(model, adapted, staging, *args):
        seen["staging"] = sorted(p.name for p in staging.iterdir())
        real_verify(model, adapted, staging, *args)
        raise engine.LlmshrinkError("reload check failed (simulated)")

    monkeypatch.setattr(engine, "_verify", failing_verify)
    assert main(["apply", str(path)]) == 2
    assert "adapter" in seen["staging"] and "model.safetensors" in seen["staging"]  # it was written, then dropped
    assert [p.name for p in runs.iterdir()] == ["out"]  # no work folder, no temporary sibling
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert list(scratch.iterdir()) == []

    monkeypatch.setattr(engine, "_verify", real_verify)
    assert main(["apply", str(path)]) == 0
    assert [p.name for p in runs.iterdir()] == ["out"]
    assert not (out / "old.txt").exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
    manifest = json.loads((out / "llmshrink.json").read_text())
    assert manifest["checks"]["reload_max_abs_logit_diff"] == 0.0
    assert manifest["metrics"]["compressed"]["size_bytes"] > 0 and (out / "report.md").is_file()
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("published", [False, True])
def test_leftovers_of_a_killed_run_are_cleared_but_not_its_training_state(tmp_path, published):
    out = tmp_path / "out"
    work = work_dir_for(out)
    for name in (STAGING_DIR, "stage-1-distill/step-00000004", "adapter.partial"):
        (work / name).mkdir(parents=True)
    (work / PREVIOUS_DIR).mkdir()
    (work / PREVIOUS_DIR / "old.txt").write_text("the previous checkpoint")
    if published:  # killed after the new output was renamed in, before the work folder was removed
        out.mkdir()
    engine._clear_leftovers(work, out)
    assert sorted(p.name for p in work.iterdir()) == ["stage-1-distill"]
    # Killed between moving the old output aside and renaming the new one in: the old one comes back.
    assert (out / "old.txt").exists() is not published


def test_the_reload_check_compares_every_weight_bit_for_bit(tmp_path, tiny_model_dir, tiny_text, monkeypatch, capsys):
    out = tmp_path / "out"
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe_text(tiny_model_dir, tiny_text, out))
    real_load = engine.load_checkpoint

    def load_with_one_bit_off(directory, **kwargs):  # as a file that does not hold what was saved would
        model = real_load(directory, **kwargs)
        weight = model.get_submodule("transformer.h.1.attn.c_proj").weight
        with torch.no_grad():
            weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
        return model

    monkeypatch.setattr(engine, "load_checkpoint", load_with_one_bit_off)
    assert main(["apply", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"llmshrink: error: {out}: reloaded weights differ from the compressed model's: "
                   "transformer.h.1.attn.c_proj.weight")
    assert not out.exists()
