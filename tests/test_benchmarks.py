"""The README's benchmark commands run (cut down) and print their side-by-side tables (slow)."""

from __future__ import annotations

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

