"""Perplexity on several named datasets: `apply` measures each, the manifest, report.md and the card show each
by name, and `compare` gives each a column and plots the one marked `domain: out` by default."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from llmshrink.cli import main


def recipe_text(model_dir, text_file, out_dir, perplexity: str, name: str = "tiny-two") -> str:
    return f"""\
name: {name}
model: {{id: {model_dir}}}
data: {{source: {text_file}}}
stages:
  - low_rank: {{targets: '.*mlp\\.c_fc', rank: 8}}
evaluate:
  perplexity: {perplexity}
  latency: null
  macs: false
  memory: false
output: {{dir: {out_dir}}}
"""


def two_datasets(text_file) -> str:
    return (f"[{{name: own, data: {{source: {text_file}, max_tokens: 300}}, window: 32, stride: 16}}, "
            "{name: docs, domain: out, data: {source: builtin:python_docs, split: test, max_tokens: 200}, "
            "window: 16, stride: 16}]")


def apply(tmp_path, model_dir, text_file, perplexity: str, name: str):
    out = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe_text(model_dir, text_file, out, perplexity, name))
    assert main(["apply", str(path)]) == 0
    return out, json.loads((out / "llmshrink.json").read_text())


def test_two_datasets_land_everywhere_by_name(tmp_path, tiny_model_dir, tiny_text):
    out, manifest = apply(tmp_path, tiny_model_dir, tiny_text, two_datasets(tiny_text), "tiny-two")
    base, small = manifest["metrics"]["base"], manifest["metrics"]["compressed"]
    for metrics in (base, small):
        by_name = metrics["perplexity_by_dataset"]
        assert list(by_name) == ["own", "docs"] and by_name["own"] == metrics["perplexity"]  # the first is primary
        assert by_name["docs"] != by_name["own"] and all(v > 1 for v in by_name.values())
    assert manifest["stages"][-1]["perplexity"] == small["perplexity"]
    protocol = manifest["evaluation"]["perplexity"]
    assert protocol["dataset"] == str(tiny_text) and protocol["window"] == 32  # the primary's, as before
    assert list(protocol["datasets"]) == ["own", "docs"]
    docs = protocol["datasets"]["docs"]
    assert (docs["dataset"], docs["window"], docs["tokens"], docs["domain"]) == ("builtin:python_docs", 16, 200, "out")
    assert protocol["datasets"]["own"]["domain"] == "in"

    report = (out / "report.md").read_text()
    ratio = small["perplexity_by_dataset"]["docs"] / base["perplexity_by_dataset"]["docs"]
    assert (f"| perplexity (docs) | {base['perplexity_by_dataset']['docs']:.2f} | "
            f"{small['perplexity_by_dataset']['docs']:.2f} | {ratio:.2f}x |") in report
    assert "| perplexity (own) |" in report and "| perplexity |" not in report
    assert ("Perplexity protocol (docs, out-of-domain): dataset builtin:python_docs (test), window 16, stride 16, "
            "200 tokens") in report
    assert "Perplexity protocol (own, in-domain): dataset " in report
    assert "| stage | seconds | params after | perplexity after (own) |" in report

    text = (out / "README.md").read_text()
    assert "| perplexity (own) |" in text and "| perplexity (docs) |" in text
    assert "Perplexity protocol (docs, out-of-domain): dataset builtin:python_docs (test)" in text
    _, results = model_index_to_eval_results(ModelCard(text).data.to_dict()["model-index"])
    ppl = {r.metric_name: (r.dataset_name, r.metric_value) for r in results if r.metric_type == "perplexity"}
    assert ppl == {"Perplexity (own)": (str(tiny_text), round(small["perplexity_by_dataset"]["own"], 4)),
                   "Perplexity (docs)": ("builtin:python_docs", round(small["perplexity_by_dataset"]["docs"], 4))}

    # One spec, as before: today's keys only.
    one = f"{{data: {{source: {tiny_text}, max_tokens: 300}}, window: 32, stride: 16}}"
    single_out, single = apply(tmp_path, tiny_model_dir, tiny_text, one, "tiny-one")
    assert "perplexity_by_dataset" not in single["metrics"]["compressed"]
    assert "datasets" not in single["evaluation"]["perplexity"]
    assert single["metrics"]["compressed"]["perplexity"] == small["perplexity"]  # same text, same protocol
    assert "| perplexity |" in (single_out / "report.md").read_text()

    assert main(["compare", str(out), str(single_out), "-o", str(tmp_path / "cmp")]) == 0
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["metric"] == "perplexity_by_dataset/docs" and data["higher_is_better"] is False
    assert data["metric_label"] == "perplexity (docs, out-of-domain)"
    assert data["pareto"] and "tiny-one" not in data["pareto"]  # it has no docs perplexity: not plotted
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| name | passes |"))
    assert ("| perplexity | ppl ratio | perplexity (own) | ppl (own) ratio | perplexity (docs) | ppl (docs) ratio |"
            in header)
    assert "size on disk (smaller is better) and perplexity (docs, out-of-domain) (lower is better)" in md
    assert "- tiny-two: own: dataset " in md and "; docs (out-of-domain): dataset builtin:python_docs (test)" in md
