"""The command line end to end on a tiny model: apply writes a checkpoint that reloads exactly;
bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import llmshrink
from llmshrink.cli import main


def recipe_text(model_dir, text_file, out_dir, kron: str = "{targets: '.*mlp\\.c_fc', a_shape: [16, 8]}"):
    return f"""\
name: tiny
model: {{id: {model_dir}}}
data: {{source: {text_file}}}
stages:
  - kronecker: {kron}
  - distill: {{steps: 4, batch_size: 2, seq_len: 32, warmup_steps: 1, lr: 1.0e-3}}
evaluate:
  perplexity: {{data: {{source: {text_file}, max_tokens: 300}}, window: 32, stride: 16}}
  latency: {{prompt_tokens: 4, new_tokens: 4, repeats: 1}}
  memory: false  # a fresh process per model: tests/test_apply_evaluate.py covers it
output: {{dir: {out_dir}}}
"""


@pytest.fixture
def recipe(tmp_path, tiny_model_dir, tiny_text):
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe_text(tiny_model_dir, tiny_text, tmp_path / "out"))
    return path


def test_apply_writes_a_checkpoint_that_reloads_exactly(recipe, tmp_path, capsys, monkeypatch):
    import llmshrink.engine as engine

    ids = torch.arange(10).unsqueeze(0)
    after = {}  # logits of the model in memory after the last stage: what apply saves (no LoRA to merge)
    real_get_pass = engine.get_pass

    class Recording:
        def __init__(self, spec):
            self.spec = spec

        def __getattr__(self, name):
            return getattr(self.spec, name)

        def apply(self, model, config, ctx):
            record = self.spec.apply(model, config, ctx)
            was_training = model.training
            with torch.no_grad():
                after["logits"] = model.eval()(ids).logits.clone()
            model.train(was_training)
            return record

    monkeypatch.setattr(engine, "get_pass", lambda name: Recording(real_get_pass(name)))
    assert main(["apply", str(recipe)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    for name in ["config.json", "model.safetensors", "recipe.yaml", "llmshrink.json", "README.md", "report.md",
                 "modeling_llmshrink.py", "kronecker.py", "training_curves.png"]:
        assert (out / name).is_file(), name
    assert "![training loss and eval perplexity by tokens](training_curves.png)" in (out / "report.md").read_text()
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "llmshrink.json").read_text())
    assert [p["pass"] for p in manifest["passes"]] == ["kronecker", "distill"]
    layers = manifest["passes"][0]["record"]["layers"]
    assert [layer["name"] for layer in layers] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert layers[0]["a_shape"] == [16, 8] and layers[0]["b_shape"] == [16, 8]
    assert manifest["checks"]["reload_max_abs_logit_diff"] == 0.0
    curve = manifest["passes"][1]["record"]["curve"]
    assert curve["tokens"] == [64, 128, 192, 256] and len(curve["loss"]) == 4  # 4 steps of 2 x 32 tokens
    base, small = manifest["metrics"]["base"], manifest["metrics"]["compressed"]
    assert small["params"] == base["params"] - 2 * (256 * 64 - (16 * 8 + 16 * 8))
    assert small["size_bytes"] < base["size_bytes"]
    assert manifest["evaluation"]["perplexity"]["window"] == 32
    assert (out / "recipe.yaml").read_text() == recipe.read_text()
    mask = os.umask(0)
    os.umask(mask)
    for name in ["model.safetensors", "report.md", "llmshrink.json"]:  # not mkstemp's owner-only 0600
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert "perplexity" in printed and "[1/7] load" in printed

    with torch.no_grad():
        reloaded = llmshrink.load(out)(ids).logits
    assert torch.equal(reloaded, after["logits"])


def test_existing_output_is_refused_before_any_work(recipe, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["apply", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"llmshrink: error: output.dir: {tmp_path / 'out'} already exists; " \
                  "set output.overwrite: true or choose another dir"


def test_shape_that_cannot_factor_is_one_line(tmp_path, tiny_model_dir, tiny_text, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe_text(tiny_model_dir, tiny_text, tmp_path / "out", kron="{a_shape: [3, 5]}"))
    assert main(["apply", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "llmshrink: error: kronecker: transformer.h.0.mlp.c_fc: layer 256x64: factor shapes A=3x5")
    assert not (tmp_path / "out").exists()


def test_validate_and_exit_codes_through_the_console_entry(tmp_path, recipe):
    ok = subprocess.run([sys.executable, "-m", "llmshrink", "validate", str(recipe)], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("ok (2 stages: kronecker, distill)")
    bad = recipe.read_text().replace("steps: 4", "steps: four")
    recipe.write_text(bad)
    res = subprocess.run([sys.executable, "-m", "llmshrink", "validate", str(recipe)], capture_output=True,
                         text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"llmshrink: error: {recipe}: stages[1].distill.steps: input should be a valid integer, got 'four'"
    ]


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("llmshrink.recipe.load_recipe", broken)
    assert main(["validate", "r.yaml"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "llmshrink: error: validate failed: RuntimeError: boom (run with --debug for the traceback)"
    ]
    for argv in (["--debug", "validate", "r.yaml"], ["validate", "r.yaml", "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last)") and "RuntimeError: boom\nsecond line" in err
        assert err.strip().splitlines()[-1] == "llmshrink: error: validate failed: RuntimeError: boom"


def test_bad_input_stays_exit_2_and_debug_adds_its_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["validate", str(missing)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"llmshrink: error: {missing}: no such recipe file"]
    assert main(["--debug", "validate", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.strip().splitlines()[-1] == \
        f"llmshrink: error: {missing}: no such recipe file"
    with pytest.raises(SystemExit) as usage:  # argparse: usage line + error, exit 2
        main(["validate"])
    assert usage.value.code == 2


def test_interrupted_apply_resumes_to_the_same_weights(tmp_path, tiny_model_dir, tiny_text, monkeypatch,
                                                        capsys):
    from safetensors.torch import load_file

    import llmshrink.passes.distill as distill_pass
    from llmshrink.engine import work_dir_for

    def run(out, interrupt_after=None) -> int:
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(recipe_text(tiny_model_dir, tiny_text, out).replace("steps: 4,", "steps: 6, save_every: 2,"))
        return main(["apply", str(path)])

    assert run(tmp_path / "straight") == 0
    assert not work_dir_for(tmp_path / "straight").exists()  # state is dropped once the checkpoint is saved

    original = distill_pass.logit_kd_loss
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        inner = original(*args, **kwargs)

        def loss_fn(*args):
            calls["n"] += 1
            if calls["n"] == 4:  # during step 4: steps 1-2 were saved, 3 was not
                raise KeyboardInterrupt
            return inner(*args)

        return loss_fn

    monkeypatch.setattr(distill_pass, "logit_kd_loss", crashing)
    assert run(tmp_path / "resumed") == 130
    assert not (tmp_path / "resumed").exists() and work_dir_for(tmp_path / "resumed").is_dir()
    monkeypatch.setattr(distill_pass, "logit_kd_loss", original)
    capsys.readouterr()
    assert run(tmp_path / "resumed") == 0
    assert "resuming from step 2 of 6" in capsys.readouterr().out

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key
    manifest = json.loads((tmp_path / "resumed" / "llmshrink.json").read_text())
    assert manifest["passes"][1]["record"]["steps"] == 6


def test_torchrun_two_processes_train_data_parallel_and_save_once(tmp_path, tiny_model_dir, tiny_text):
    """The README's multi-process command: every process runs the stages, the main one saves."""
    out = tmp_path / "out"
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe_text(tiny_model_dir, tiny_text, out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llmshrink", "apply",
           str(path), "--set", "device=cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1: stages done; the main process evaluates and saves" in done.stdout
    manifest = json.loads((out / "llmshrink.json").read_text())
    record = manifest["passes"][1]["record"]
    assert record["tokens"] == 2 * 4 * 2 * 32  # 2 processes x 4 steps x batch 2 x 32 tokens
    assert manifest["checks"]["reload_max_abs_logit_diff"] == 0.0
