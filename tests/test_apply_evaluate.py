"""`apply` with every evaluation on: lm-eval, generation, MACs and peak RAM land in the manifest, report and
card; `llmshrink eval` reproduces the lm-eval numbers; `compare` and `push --dry-run` read the checkpoint."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from llmshrink.cli import main

TASK = "llmshrink_commonsense_mc"


def recipe_text(model_dir, text_file, out_dir) -> str:
    return f"""\
name: tiny-eval
model: {{id: {model_dir}}}
data: {{source: {text_file}}}
stages:
  - low_rank: {{targets: '.*mlp\\.c_fc', rank: 8}}
evaluate:
  perplexity: {{data: {{source: {text_file}, max_tokens: 300}}, window: 32, stride: 16}}
  latency: {{prompt_tokens: 4, new_tokens: 4, repeats: 1}}
  lm_eval: {{tasks: [{TASK}], limit: 4}}
  generation: {{data: builtin:data_to_text, limit: 3, max_new_tokens: 4, batch_size: 2}}
output: {{dir: {out_dir}}}
"""


def test_apply_evaluates_everything_and_the_cli_reads_it_back(tmp_path, tiny_model_dir, tiny_text, capsys):
    out = tmp_path / "out"
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe_text(tiny_model_dir, tiny_text, out))
    assert main(["apply", str(path)]) == 0
    manifest = json.loads((out / "llmshrink.json").read_text())
    base, small = manifest["metrics"]["base"], manifest["metrics"]["compressed"]

    # MACs per token: the c_fc layers (64 -> 256) became rank 8, i.e. 8 * (64 + 256) per token instead of
    # 64 * 256, in both blocks; attention is the same (same prompt length, same model shape).
    assert base["macs_per_token"] - small["macs_per_token"] == 2 * (64 * 256 - 8 * (64 + 256))
    assert base["decode_macs_per_token"] - small["decode_macs_per_token"] == 2 * (64 * 256 - 8 * (64 + 256))
    assert manifest["evaluation"]["macs"]["seq_len"] == 4
    for metrics in (base, small):
        assert 0 < metrics["peak_ram_load_mb"] <= metrics["peak_ram_generate_mb"]
        assert 0 <= metrics["lm_eval"][TASK]["acc"] <= 1
        assert set(metrics["generation"]) == {"rouge1", "rouge2", "rougeL", "bleu"}
    assert manifest["evaluation"]["lm_eval"]["tasks"][TASK]["samples"] == 4
    generation = manifest["evaluation"]["generation"]
    assert generation["samples"] == 3 and len(generation["compressed_examples"]) == 3

    report = (out / "report.md").read_text()
    assert f"| {TASK} acc |" in report and "| rouge1 |" in report and "| MACs/token (M) |" in report
    card = ModelCard((out / "README.md").read_text())
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {r.metric_type for r in results} >= {"perplexity", "acc", "rouge1"}

    # `llmshrink eval` on the saved checkpoint gives the numbers apply recorded for the compressed model.
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", TASK, "--limit", "4", "--output", str(tmp_path / "ev.json")]) == 0
    again = json.loads((tmp_path / "ev.json").read_text())
    assert again["results"][TASK] == small["lm_eval"][TASK]

    assert main(["compare", str(out), "-o", str(tmp_path / "cmp")]) == 0
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [row["kind"] for row in table["rows"]] == ["base", "checkpoint"]
    assert (tmp_path / "cmp" / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    capsys.readouterr()
    assert main(["push", str(out), "--repo-id", "me/tiny-eval", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "model.safetensors" in listed and "llmshrink.json" in listed
