"""The shipped offline recipe on the real built-in model, cut down to a few steps (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llmshrink
from llmshrink.cli import main

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2-kron-offline.yaml"


@pytest.mark.slow
def test_offline_recipe_short_run_reloads_exactly(tmp_path):
    out = tmp_path / "out"
    code = main([
        "apply", str(RECIPE), "--output", str(out),
        "--set", "stages.0.kronecker.select_layers=2",
        "--set", "stages.0.kronecker.calibration_tokens=64",
        "--set", "stages.0.kronecker.layers=[12,13,14]",
        "--set", "stages.1.distill.steps=2",
        "--set", "stages.1.distill.batch_size=1",
        "--set", "stages.1.distill.seq_len=64",
        "--set", "data.tokens=512",  # the mix: 256 Shakespeare tokens, 256 sampled from the model in batches of 2
        "--set", "data.teacher.batch_size=2",
        "--set", "data.teacher.sample_tokens=32",
        "--set", "evaluate.perplexity.0.data.max_tokens=300",
        "--set", "evaluate.perplexity.0.window=128",
        "--set", "evaluate.perplexity.0.stride=64",
        "--set", "evaluate.perplexity.1.data.max_tokens=300",
        "--set", "evaluate.perplexity.1.window=128",
        "--set", "evaluate.perplexity.1.stride=64",
        "--set", "evaluate.latency.repeats=1",
    ])
    assert code == 0
    manifest = json.loads((out / "llmshrink.json").read_text())
    kron = manifest["passes"][0]["record"]
    assert len(kron["selection"]["chosen"]) == 2 and set(kron["selection"]["chosen"]) <= {12, 13, 14}
    assert len(kron["layers"]) == 6  # gate, up, down of the two chosen blocks
    base, small = manifest["metrics"]["base"], manifest["metrics"]["compressed"]
    assert base["params"] == 134_515_008
    # gate/up: 32x24 ⊗ 48x24, down: 32x24 ⊗ 18x64; 4 terms of 1,920 params each replace 884,736.
    assert small["params"] == base["params"] - 6 * (1536 * 576 - 4 * (32 * 24 + 48 * 24))
    assert manifest["base_model"]["tie_word_embeddings"] is True
    assert manifest["checks"]["reload_max_abs_logit_diff"] == 0.0
    assert 1.0 < base["perplexity"] < 200.0
    assert manifest["passes"][1]["record"]["blocks"] == 512 // 64  # half corpus, half teacher samples
    assert list(base["perplexity_by_dataset"]) == ["shakespeare", "python_docs"]
    assert base["perplexity_by_dataset"]["shakespeare"] == base["perplexity"]

    model = llmshrink.load(out)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
