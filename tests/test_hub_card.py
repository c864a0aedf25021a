"""The model card: its metadata parses back with huggingface_hub's own card tools, with the numbers intact.

(ModelCard.validate() posts the card to the hub's /api/validate-yaml, which is unreachable here; these
tests use the local parsers, which raise on a malformed model-index.)
"""

from __future__ import annotations

import copy

import pytest
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from llmshrink.hub import REPO_PLACEHOLDER, card_data, model_card

RECIPE = "name: gpt2-kron\nmodel:\n  id: openai-community/gpt2\n"
MANIFEST = {
    "name": "gpt2-kron",
    "description": "GPT-2 with Kronecker-factored MLPs.",
    "license": "mit",
    "base_model": {"id": "openai-community/gpt2", "revision": "607a30d"},
    "passes": [{"pass": "kronecker", "record": {"blocks": 3, "terms": 4}}, {"pass": "prune_ffn", "record": {}}],
    "metrics": {
        "base": {"params": 124_439_808, "perplexity": 46.77, "lm_eval": {"hellaswag": {"acc,none": 0.2891}},
                 "generation": {"rouge1": 0.5}},
        "compressed": {
            "params": 97_000_000, "perplexity": 66.7312345,
            # lm-eval's raw row and lm_eval_bridge's compact one are both read.
            "lm_eval": {"hellaswag": {"acc,none": 0.2745, "acc_stderr,none": 0.0044, "acc_norm,none": 0.2981,
                                      "alias": "hellaswag"},
                        "arc_easy": {"acc": 0.4312, "acc_stderr": 0.01}},
            # eval/generation.py's result: only the scores are metrics.
            "generation": {"rouge1": 0.41, "rougeL": 0.38, "samples": 50, "prompts_truncated": 0,
                           "data": "/abs/evals/data/prompts.jsonl", "examples": [{"prompt": "p"}]},
        },
    },
    "evaluation": {
        "perplexity": {"dataset": "builtin:shakespeare", "config": None, "split": "test", "window": 512,
                       "stride": 256, "tokens": 4096, "bos": None},
        "generation": {"dataset": "local:prompts.jsonl", "split": "test"},
        "lm_eval": {"tasks": {"hellaswag": {"num_fewshot": 0, "samples": 100, "version": 1.0}}},
    },
}
EXPECTED_RESULTS = {
    ("builtin:shakespeare", "perplexity"): 66.7312,
    ("hellaswag", "acc"): 0.2745,
    ("hellaswag", "acc_norm"): 0.2981,
    ("arc_easy", "acc"): 0.4312,
    ("local:prompts.jsonl", "rouge1"): 0.41,
    ("local:prompts.jsonl", "rougeL"): 0.38,
}


def _results(metadata: dict) -> dict[tuple[str, str], float]:
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "gpt2-kron"
    return {(r.dataset_type, r.metric_type): r.metric_value for r in results}


def test_card_metadata_parses_back_with_huggingface_hub(tmp_path):
    text = model_card(MANIFEST, RECIPE)
    card = ModelCard(text)  # ignore_metadata_errors=False: a bad model-index raises here
    assert card.data.base_model == "openai-community/gpt2"
    assert card.data.license == "mit"
    assert card.data.tags == ["llmshrink", "compression", "kronecker", "prune_ffn"]
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results} == EXPECTED_RESULTS

    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    metadata = metadata_load(path)
    assert metadata == ModelCard.load(path).data.to_dict()
    assert {k: metadata[k] for k in ("base_model", "license", "library_name", "pipeline_tag")} == {
        "base_model": "openai-community/gpt2", "license": "mit", "library_name": "transformers",
        "pipeline_tag": "text-generation"}
    assert _results(metadata) == EXPECTED_RESULTS
    # The perplexity result names its protocol: split and window/stride/tokens.
    ppl = next(r for r in model_index_to_eval_results(metadata["model-index"])[1] if r.metric_type == "perplexity")
    assert (ppl.task_type, ppl.dataset_split, ppl.metric_args) == (
        "text-generation", "test", {"window": 512, "stride": 256, "tokens": 4096})
    acc = next(r for r in model_index_to_eval_results(metadata["model-index"])[1] if r.dataset_type == "hellaswag")
    assert acc.metric_args == {"num_fewshot": 0, "samples": 100}
    # Re-serialising through ModelCard keeps the metadata unchanged.
    assert metadata_load(_write(tmp_path / "again.md", str(ModelCard(text)))) == metadata


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_card_body_has_tables_recipe_license_and_load_snippets():
    text = model_card(MANIFEST, RECIPE)
    body = ModelCard(text).text
    assert "# gpt2-kron" in body and "GPT-2 with Kronecker-factored MLPs." in body
    assert "`openai-community/gpt2` (revision `607a30d`)" in body
    assert "| params | 124,439,808 | 97,000,000 | 0.78x |" in body
    assert "| perplexity | 46.77 | 66.73 | 1.43x |" in body
    assert "Perplexity protocol: dataset builtin:shakespeare (test), window 512, stride 256, 4,096 tokens" in body
    assert "| hellaswag acc | 0.2891 | 0.2745 | 0.95x |" in body
    assert "| hellaswag acc_norm | - | 0.2981 | - |" in body
    assert "| rouge1 | 0.5 | 0.41 | 0.82x |" in body
    assert "| arc_easy acc | - | 0.4312 | - |" in body
    assert "acc_stderr" not in body and "alias" not in body and "| samples" not in body
    assert "1. `kronecker`: blocks=3, terms=4\n2. `prune_ffn`" in body
    assert f"```yaml\n{RECIPE}```" in body
    assert "## License\n\n`mit`. This model is derived from `openai-community/gpt2`" in body
    assert f'llmshrink.load(snapshot_download("{REPO_PLACEHOLDER}"))' in body
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_PLACEHOLDER}", trust_remote_code=True)' in body
    assert 'AutoModelForCausalLM.from_pretrained("acme/gpt2-kron", trust_remote_code=True)' in model_card(
        MANIFEST, RECIPE, repo_id="acme/gpt2-kron")


def test_minimal_manifest_gives_a_valid_card_without_results_and_license_other():
    card = ModelCard(model_card({"name": "t"}, "name: t\n"))
    assert card.data.to_dict() == {"library_name": "transformers", "license": "other",
                                   "pipeline_tag": "text-generation", "tags": ["llmshrink", "compression"]}
    assert "Not recorded by llmshrink" in card.text and "set `license:`" in card.text
    assert "## Metrics" not in card.text and "## Task metrics" not in card.text


@pytest.mark.parametrize("base, expected", [
    ("builtin:smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # the builtin GGUF's upstream
    ("/home/me/models/tiny", None),  # a local path is not a hub id
    ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
])
def test_base_model_is_a_hub_id_or_absent(base, expected):
    data = card_data({"name": "t", "base_model": {"id": base}})
    assert data.base_model == expected
    assert ModelCard(model_card({"name": "t", "base_model": {"id": base}}, "")).data.base_model == expected


def test_license_from_base_model_and_architecture_sets_pipeline_and_loader():
    manifest = {"name": "b", "base_model": {"id": "google-bert/bert-base-uncased", "license": "apache-2.0"},
                "architecture": "BertForMaskedLM"}
    text = model_card(manifest, "")
    card = ModelCard(text)
    assert (card.data.license, card.data.pipeline_tag) == ("apache-2.0", "fill-mask")
    assert f'AutoModelForMaskedLM.from_pretrained("{REPO_PLACEHOLDER}"' in text
    assert card_data({"name": "g"}, architecture="GPT2LMHeadModel").pipeline_tag == "text-generation"


def test_non_finite_and_non_numeric_metrics_are_left_out():
    manifest = copy.deepcopy(MANIFEST)
    manifest["metrics"]["compressed"].update(perplexity=float("nan"), generation={"rouge1": "n/a", "bleu": 12.5})
    manifest["metrics"]["compressed"]["lm_eval"] = {"hellaswag": {"acc,none": float("inf"), "acc,flex": 0.5}}
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in ModelCard(model_card(manifest, "")).data.eval_results}
    assert results == {("hellaswag", "acc,flex"): 0.5, ("local:prompts.jsonl", "bleu"): 12.5}


def test_generation_dataset_falls_back_to_the_data_file_name():
    manifest = {"name": "g", "metrics": {"compressed": {"generation": {
        "rougeL": 31.5, "samples": 8, "data": "/home/me/repo/evals/data/data_to_text_test.jsonl"}}}}
    (result,) = card_data(manifest).eval_results
    assert (result.dataset_type, result.metric_type, result.metric_value) == ("data_to_text_test.jsonl", "rougeL", 31.5)
