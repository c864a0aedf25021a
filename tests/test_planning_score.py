"""The planner's decision score (search.score): KL(base || model) per token by default, or the text's NLL.

What these tests show, on tiny random Llama models:
- The KL score is 0 for the base itself and equals a hand computation (softmax of full-model logits window by
  window, sum p (log p - log q), mean over tokens) for a changed model.
- kl and nll measurements are cached apart (another file each) and the plan records which score it used; the
  joint measurement after the planned stages uses the same score as the decisions (KL from the base's
  log-probabilities taken before the stages ran).
- A score other than kl / nll is refused in one line.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from test_planning_target import context, run_stages, world  # noqa: F401  (world: the module fixture)

from llmshrink.cli import main
from llmshrink.planning import planner
from llmshrink.planning.measure import calibration_ids, calibration_window, measure, reference_log_probs
from llmshrink.planning.spec import SearchSpec, TargetSpec

SEARCH = {"drop_layers": True, "prune_ffn": [0.5], "prune_heads": [], "calibration_tokens": 64}


def test_kl_score_is_zero_for_the_base_and_matches_a_hand_computation():
    torch.manual_seed(0)
    base = tiny_llama(layers=4)
    ids = torch.randint(0, base.config.vocab_size, (40,))
    window = 16  # windows of 16, 16 and 8 tokens
    reference = reference_log_probs(base, ids, window, torch.device("cpu"))
    assert reference.shape == (40, base.config.vocab_size)
    assert measure(base, ids, window, torch.device("cpu"), reference).loss == pytest.approx(0.0, abs=1e-7)

    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.add_(torch.randn_like(changed.model.layers[1].mlp.down_proj.weight))
    got = measure(changed, ids, window, torch.device("cpu"), reference).loss

    total = 0.0
    with torch.no_grad():
        for start in (0, 16, 32):
            chunk = ids[start:start + window][None]
            p = torch.softmax(base(chunk).logits[0].double(), -1)
            q = torch.softmax(changed(chunk).logits[0].double(), -1)
            total += float((p * (p.log() - q.log())).sum())
    assert got > 1e-3 and got == pytest.approx(total / 40, rel=1e-4)

    nll = measure(changed, ids, window, torch.device("cpu")).loss  # without a reference: the text's NLL
    assert nll > 1.0 and nll != pytest.approx(got)


def test_scores_are_cached_apart_and_the_joint_measurement_uses_the_plans_score(tmp_path, world):  # noqa: F811
    model = tiny_llama(seed=1, layers=4)
    plans = {}
    for score in ("kl", "nll"):
        plans[score] = planner.plan(model, TargetSpec(params=0.8), SearchSpec(**SEARCH, score=score), context(world),
                                    cache_dir=tmp_path, log=lambda _: None)
        assert plans[score].record["score"] == score
    assert len(list(tmp_path.iterdir())) == 2
    assert plans["kl"].base.loss == pytest.approx(0.0, abs=1e-7) and plans["nll"].base.loss > 1.0

    planned = plans["kl"]
    window = calibration_window(model)
    ids = calibration_ids(context(world), 64, window)
    assert torch.equal(planned.calibration, ids)
    reference = reference_log_probs(model, ids, window, torch.device("cpu"))
    changed = copy.deepcopy(model)
    run_stages(changed, planned.stages, context(world))
    got = planner.check_planned(changed, planned, context(world))
    assert got["loss"] == pytest.approx(measure(changed, ids, window, torch.device("cpu"), reference).loss, rel=1e-6)
    assert got["loss"] > 0.0


def test_an_unknown_score_is_refused_in_one_line(tmp_path, world, capsys):  # noqa: F811
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nmodel: {{id: '{world.dirs['llama']}'}}\ndata: {{source: '{world.text}'}}\n"
                    "stages: []\noutput: {dir: out}\ntarget: {params: 0.7}\nsearch: {score: ppl}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llmshrink: error: {path}: search.score: input should be 'kl' or 'nll', got 'ppl'"]
