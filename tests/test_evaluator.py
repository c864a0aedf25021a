"""The perplexity protocol records what differs per measured model: after an untie, base tied and compressed not."""

from __future__ import annotations

import torch
from conftest import tiny_llama, tiny_tokenizer

from llmshrink.eval.evaluator import Evaluator
from llmshrink.eval.report import protocol_line, render_report_md
from llmshrink.recipe import Recipe


def test_tied_embeddings_are_recorded_per_measured_model(tiny_text):
    recipe = Recipe.model_validate({
        "name": "t", "output": {"dir": "unused"},
        "evaluate": {"perplexity": {"data": {"source": str(tiny_text), "max_tokens": 100}, "window": 16, "stride": 8},
                     "latency": None, "macs": False, "memory": False},
    })
    evaluator = Evaluator(recipe, tiny_tokenizer(), torch.device("cpu"))
    base, compressed = tiny_llama(), tiny_llama()
    compressed.lm_head.weight = torch.nn.Parameter(compressed.lm_head.weight.detach().clone())  # untied
    # The compressed model is measured first (its perplexity after the last stage), the base after it.
    evaluator.measure(compressed, "compressed", print, known=evaluator.perplexity(compressed))
    evaluator.measure(base, "base", print)
    protocol = evaluator.protocol
    assert protocol["tied_embeddings"] == {"compressed": False, "base": True}
    assert protocol["window"] == 16 and protocol["tokens"] == 100
    assert protocol_line(protocol).endswith("tied embeddings: compressed no, base yes")
    report = render_report_md("t", {}, {}, [], protocol, [])
    assert "- tied embeddings: compressed no, base yes" in report
    # Manifests from before: one value for both models.
    assert protocol_line({**protocol, "tied_embeddings": True}).endswith("tied embeddings: yes")


def test_several_datasets_primary_first_and_each_protocol(tiny_text):
    spec = {"data": {"source": str(tiny_text), "max_tokens": 100}, "window": 16, "stride": 8}
    recipe = Recipe.model_validate({
        "name": "t", "output": {"dir": "unused"},
        "evaluate": {"perplexity": [{**spec, "name": "a"}, {**spec, "name": "b", "domain": "out", "window": 8}],
                     "latency": None, "macs": False, "memory": False},
    })
    evaluator = Evaluator(recipe, tiny_tokenizer(), torch.device("cpu"))
    assert list(evaluator.dataset_ids) == ["a", "b"]  # loaded once, by name
    model = tiny_llama()
    primary = evaluator.perplexity(model)  # what stage rows and ctx.evaluate get
    metrics = evaluator.measure(model, "base", print)
    assert metrics["perplexity"] == primary == metrics["perplexity_by_dataset"]["a"]
    assert list(metrics["perplexity_by_dataset"]) == ["a", "b"] and metrics["perplexity_by_dataset"]["b"] != primary
    protocol = evaluator.protocol
    assert protocol["window"] == 16 and "domain" not in protocol  # the primary's fields, as with one dataset
    assert {n: (p["window"], p["domain"]) for n, p in protocol["datasets"].items()} == {"a": (16, "in"),
                                                                                       "b": (8, "out")}
