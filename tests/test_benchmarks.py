"""The README's benchmark commands run (cut down) and print their side-by-side tables (slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_kronecker_benchmark_prints_all_methods_side_by_side():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kronecker.py"), "--blocks", "12", "--eval-tokens", "300",
           "--window", "128", "--iters", "1", "--prefill", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| (dense \(base\)|kronecker\+perm|kronecker|svd) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \|", done.stdout, re.M)}
    assert set(rows) == {"dense (base)", "kronecker+perm", "kronecker", "svd"}
    errors = {name: float(row[1]) for name, row in rows.items()}
    assert errors["dense (base)"] == 0.0
    assert errors["kronecker+perm"] <= errors["kronecker"] < 1.0  # the search never loses to no permutation
    speed_rows = re.findall(r"^\| (kronecker\+perm|kronecker|svd) \| [\d.]+ \| [\d.]+ \| [\d.]+x \|", done.stdout, re.M)
    assert speed_rows == ["kronecker+perm", "kronecker", "svd"]


@pytest.mark.slow
def test_distill_benchmark_prints_every_method_and_draws_curves(tmp_path):
    png = tmp_path / "curves.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill.py"), "--blocks", "12,13", "--tokens", "1024",
           "--batch-size", "2", "--seq-len", "64", "--group-size", "1", "--evals", "1", "--eval-tokens", "512",
           "--curve-tokens", "256", "--png", str(png)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = dict(re.findall(r"^\| (base \(uncompressed\)|compressed, untrained|ce|kd|kd\+ce|kd\+hidden|layerwise) \|"
                           r" [-\d,]+ \| [-\d]+ \| ([\d.]+) \|", done.stdout, re.M))
    assert set(rows) == {"base (uncompressed)", "compressed, untrained", "ce", "kd", "kd+ce", "kd+hidden", "layerwise"}
    assert float(rows["base (uncompressed)"]) < float(rows["compressed, untrained"])
    tokens = re.findall(r"^\| (?:ce|kd|kd\+ce|kd\+hidden|layerwise) \| ([\d,]+) \|", done.stdout, re.M)
    assert tokens == ["1,024"] * 5  # equal tokens for every method
    assert re.search(r"^winner at 1,024 tokens: (ce|kd|kd\+ce|kd\+hidden|layerwise)$", done.stdout, re.M)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



@pytest.mark.slow
def test_recovery_benchmark_saves_each_run_skips_it_on_rerun_and_prints_both_domains(tmp_path):
    results, samples = tmp_path / "recovery.json", tmp_path / "samples"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "recovery.py"), "--starts", "prune_ffn,prune_ffn+refit,control",
           "--data", "mix", "--losses", "fkl+ce,skew", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "600",
           "--tasks", "", "--json", str(results), "--samples-dir", str(samples)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads(results.read_text())
    assert list(saved) == ["base", "prune_ffn/untrained", "prune_ffn/mix/fkl+ce", "prune_ffn/mix/skew",
                           "prune_ffn+refit/untrained", "prune_ffn+refit/mix/fkl+ce", "prune_ffn+refit/mix/skew",
                           "control/mix/fkl+ce"]  # the control only with the recipes' objective
    assert {row.get("tokens") for key, row in saved.items() if key.count("/") == 2} == {64}
    assert list(samples.glob("*/batch-00000.safetensors"))  # the mix's teacher half, cached
    rows = re.findall(r"^\| ([\w/+]+) \| ([\d.]+)x \| [\d.]+ \(([\d.]+)x\) \| [\d.]+ \(([\d.]+)x\) \|",
                      done.stdout, re.M)
    assert [r[0] for r in rows] == list(saved) and rows[0][1:] == ("1.00", "1.00", "1.00")
    assert float(rows[1][1]) < 0.85  # prune_ffn keep 0.66: about 0.8x the parameters
    refit, plain = saved["prune_ffn+refit/untrained"], saved["prune_ffn/untrained"]
    assert refit["params"] == plain["params"] and refit["shakespeare"] != plain["shakespeare"]  # same shape, refitted
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and json.loads(results.read_text()) == saved  # every run was skipped


@pytest.mark.slow
def test_passes_benchmark_prints_every_chosen_pass_at_about_the_target_size():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "passes.py"), "--passes", "kronecker,drop_layers,prune_ffn",
           "--eval-tokens", "256", "--calibration-tokens", "256", "--latency-repeats", "1", "--new-tokens", "8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    number = r"([\d.]+)"
    rows = {m.group(1): [float(x) for x in m.groups()[1:]] for m in re.finditer(
        rf"^\| (base|kronecker|drop_layers|prune_ffn) \| [^|]+ \| [\d,]+ \| {number}x \|"
        rf" [\d.]+ \| {number}x \| {number} \| [\d.]+x \| {number} \| [\d.]+x \| {number} \| [\d.]+x \| [\d.]+ \|$",
        done.stdout, re.M)}
    assert list(rows) == ["base", "kronecker", "drop_layers", "prune_ffn"]
    assert rows["base"][:2] == [1.0, 1.0]
    for name in ("kronecker", "drop_layers", "prune_ffn"):
        assert 0.6 < rows[name][0] < 0.8 and 0.6 < rows[name][1] < 0.8, (name, rows[name])  # params, bytes ~0.7x
    assert all(row[2] > 1.0 and row[3] > 0 and row[4] > 0 for row in rows.values())  # ppl, tok/s, prefill ms
    assert all(rows[name][2] > rows["base"][2] for name in ("kronecker", "drop_layers", "prune_ffn"))


@pytest.mark.slow
def test_layers_heads_benchmark_prints_the_n_by_h_table():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "layers_heads.py"), "--layers", "30,27", "--heads", "9,3",
           "--eval-tokens", "256", "--calibration-tokens", "256"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^\| N \\ H \| 9 \| 3 \|$", done.stdout, re.M)
    cell = r"([\d.]+) \(([\d.]+)x\)"
    rows = {int(m.group(1)): [float(x) for x in m.groups()[1:]]
            for m in re.finditer(rf"^\| (30|27) \| {cell} \| {cell} \|$", done.stdout, re.M)}
    assert sorted(rows) == [27, 30]
    assert rows[30][1] == 1.0  # the dense base: every block, every head
    assert rows[27][1] < rows[30][1] and rows[30][3] < rows[30][1] and rows[27][3] < rows[27][1]  # smaller
    assert rows[30][2] > rows[30][0] and rows[27][0] > rows[30][0]  # each cut costs perplexity, no recovery


@pytest.mark.slow
def test_precision_benchmark_prints_ratios_against_fp32():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--methods", "fp32,int8-dynamic",
           "--eval-tokens", "256", "--latency-repeats", "1", "--new-tokens", "8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    number = r"([\d.]+)"
    rows = {m.group(1): [float(x) for x in m.groups()[1:]] for m in re.finditer(
        rf"^\| (fp32|int8-dynamic) \| [\d.]+ \| {number}x \| [\d.]+ \| [\d.]+ \| [\d.]+x \| [\d.]+ \| [\d.]+x \| "
        rf"[\d.]+ \| {number}x \| [\d.]+ \| {number}x \|$", done.stdout, re.M)}
    assert list(rows) == ["fp32", "int8-dynamic"]
    assert rows["fp32"] == [1.0, 1.0, 1.0]
    size, speed, ppl = rows["int8-dynamic"]
    assert 0.3 < size < 0.5  # int8 blocks, the fp32 embedding (tied head) left as it was
    # int8-dynamic measured 1.013x fp32 on these 256 tokens (1.031x on 4096, README): 1.10 leaves ~9% for CPU
    # kernel differences, and fails where int8 regresses (per-tensor activation scales gave 2.6x).
    assert speed > 0 and 0.98 < ppl <= 1.10


@pytest.mark.slow
def test_encoders_benchmark_prints_rows_against_the_fine_tuned_base_and_skips_them_on_rerun(tmp_path):
    results = tmp_path / "encoders.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "encoders.py"), "--rows", "base,ffn,int8", "--finetune-steps",
           "10", "--distill-steps", "5", "--latency-repeats", "1", "--json", str(results)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads(results.read_text())
    assert list(saved["rows"]) == ["base", "ffn", "int8"] and saved["settings"]["finetune_steps"] == 10
    number = r"([\d.]+)"
    rows = {m.group(1): [float(x) for x in m.groups()[1:]] for m in re.finditer(
        rf"^\| (base|ffn|int8) \| [^|]+ \| [\d,]+ \| {number}x \| [\d.]+ \| {number}x \| {number} \| [\d.]+ \| "
        rf"-?[\d.]+ \| {number}x \| {number} \| {number}x \| \d+ \|$", done.stdout, re.M)}
    assert list(rows) == ["base", "ffn", "int8"]
    params, size, accuracy, kept, batch_ms, speedup = zip(*rows.values(), strict=True)
    assert rows["base"] == [1.0, 1.0, rows["base"][2], 1.0, rows["base"][4], 1.0]  # ratios to itself
    assert all(0 <= a <= 1 for a in accuracy) and all(x > 0 for x in (*kept, *batch_ms, *speedup))
    assert params[1] < 0.9 and 0.2 < size[2] < 0.3 and params[2] == 1.0  # ffn: half the FFN; int8: tables too
    assert re.search(r"^- int8-dynamic .*: (MET|not met) \(accuracy kept [\d.]+%, size 0\.2\dx\)$", done.stdout, re.M)
    assert re.search(r"^  ffn: (MET|not met: .*params 0\.\d\dx)", done.stdout, re.M)  # ffn: > 0.5x params
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "every row is in" in again.stdout and json.loads(results.read_text()) == saved


@pytest.mark.slow
def test_target_benchmark_runs_the_planned_and_single_pass_rows_and_plots(tmp_path):
    results, png = tmp_path / "target.json", tmp_path / "target.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "target.py"), "--budgets", "params:0.9",
           "--rows", "planned,drop_layers", "--steps", "1", "--eval-tokens", "600", "--calibration-tokens", "128",
           "--search", '{"drop_layers": false, "prune_heads": [], "prune_ffn": [0.25]}', "--json", str(results),
           "--work", str(tmp_path / "work"), "--plot", str(png)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads(results.read_text())
    assert list(saved) == ["base", "params:0.9/planned", "params:0.9/drop_layers"]
    planned = saved["params:0.9/planned"]
    limit = int(0.9 * saved["base"]["params"])
    assert planned["params"] <= limit and saved["params:0.9/drop_layers"]["params"] <= limit
    assert planned["plan"]["decisions"] and all(d.endswith("prune_ffn 0.25") for d in planned["plan"]["decisions"])
    assert re.search(r"^\| params:0.9 \| planned \| 0\.\d+x \| 0\.\d+x \| yes \|", done.stdout, re.M)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "work" / "params-0.9-planned").exists()  # checkpoints go unless --keep


@pytest.mark.slow
def test_deploy_benchmark_measures_each_runtime_against_pytorch_fp32_and_checks_the_target(tmp_path):
    pytest.importorskip("llama_cpp", reason='the export extra: pip install -e ".[export]"')
    results, work = tmp_path / "deploy.json", tmp_path / "work"
    # "again" is the base's own checkpoint taken as a compressed one: its q4_0 row gets a target line.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "deploy.py"), "--models", f"base,again={work / 'base-checkpoint'}",
           "--formats", "pytorch,gguf-q4_0", "--eval-tokens", "600", "--prompt-tokens", "16", "--new-tokens", "8",
           "--repeats", "1", "--json", str(results), "--work", str(work), "--plot", str(tmp_path / "deploy.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads(results.read_text())
    assert list(saved) == ["base/pytorch", "base/gguf-q4_0", "again/pytorch", "again/gguf-q4_0"]
    fp32, q4 = saved["base/pytorch"], saved["base/gguf-q4_0"]
    assert saved["again/pytorch"]["python_docs"] == fp32["python_docs"]  # the same weights, the same number
    assert 0.1 < q4["bytes"] / fp32["bytes"] < 0.25 and 1.0 < q4["python_docs"] / fp32["python_docs"] < 1.5
    assert len(q4["greedy_tokens"]) == 8 and (tmp_path / "deploy.png").read_bytes()[:4] == b"\x89PNG"
    assert re.search(r"^\| base \| gguf-q4_0 \| \d+\.\d \| 0\.\d{3}x \|", done.stdout, re.M)
    assert re.search(r"^target, again q4_0: size 0\.\d\dx <= 0\.25x: met; decode_speedup .*; "
                     r"decode_vs_base_alike \d\.\d\dx >= 1\.25x: NOT met$", done.stdout, re.M)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # every row saved: nothing rerun
    assert again.returncode == 0 and "===" not in again.stdout and json.loads(results.read_text()) == saved
