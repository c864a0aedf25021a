"""The Evaluator's encoder mode (eval/encoder_eval.py): task scores, latency per batch, quality(), the reload
check's outputs, peak RAM, and how report, card and compare show an encoder's metrics."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import model_dir, tiny_llama, tiny_tokenizer

from llmshrink.compare import higher_is_better
from llmshrink.eval.evaluator import Evaluator
from llmshrink.eval.report import comparison_rows, format_table, render_report_md
from llmshrink.hub import eval_results, model_card
from llmshrink.recipe import Recipe
from llmshrink.specs import ModelSpec

TEXTS = ["the man said that he was at the time", "she had all of them", "it was not so",
         "they were in the one", "a time for his", "but there would be more"]
LABELS = [1, 0, 1, 1, 0]  # five examples: a classifier that always answers 1 is right three times


def _config(**overrides):
    from transformers import BertConfig

    return BertConfig(**{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64, **overrides})


def always(label: int, num_labels: int = 2):
    """A tiny BERT classifier whose logits are its classifier bias: it predicts `label` for every text."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(_config(num_labels=num_labels)).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), num_labels) * 5.0)
    return model


def tiny_encoder(seed: int = 0):
    from transformers import BertModel

    torch.manual_seed(seed)
    return BertModel(_config(), add_pooling_layer=False).eval()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(task: dict, model_task: str, latency: dict | None = None, macs: bool = False) -> Recipe:
    return Recipe.model_validate({
        "name": "enc", "output": {"dir": "unused"}, "model": {"id": "unused", "task": model_task}, "task": task,
        "evaluate": {"latency": {"repeats": 2, **(latency or {})}, "macs": macs, "memory": False},
    })


@pytest.fixture
def classification(tmp_path):
    source = _jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS, strict=False)])
    return {"kind": "classification", "source": source}


@pytest.fixture
def similarity(tmp_path):
    rows = [{"text": TEXTS[i], "text_pair": TEXTS[(i + 2) % 6], "score": s}
            for i, s in enumerate([0.5, 4.0, 2.5, 1.0, 3.0, 5.0])]
    return {"kind": "similarity", "source": _jsonl(tmp_path / "sim.jsonl", rows)}


def test_classifier_scores_are_hand_counted(classification):
    evaluator = Evaluator(_recipe(classification, "sequence_classification", {"batch_size": 4}, macs=True),
                          tiny_tokenizer(), torch.device("cpu"))
    assert not evaluator.has_perplexity and evaluator.has_quality and evaluator.quality_name == "accuracy"
    model = always(1)
    metrics = evaluator.measure(model, "base", print, known=123.0)  # no quality() gave 123.0: scored
    # 3 of 5 right; class 1: precision 3/5, recall 1 -> F1 0.75; constant predictions: MCC 0.
    assert metrics["accuracy"] == pytest.approx(0.6) and metrics["f1"] == pytest.approx(0.75)
    assert metrics["matthews_corrcoef"] == 0.0
    assert metrics["params"] == sum(p.numel() for p in model.parameters()) and metrics["size_bytes"] > 0
    assert metrics["batch_ms"] > 0 and metrics["examples_per_s"] == pytest.approx(4000 / metrics["batch_ms"])
    assert metrics["macs_per_token"] > 0
    assert not {"perplexity", "decode_tokens_per_s", "prefill_ms", "examples"} & set(metrics)
    assert evaluator.quality(model) == pytest.approx(0.6)
    assert evaluator.tasks(model, "base", print) == {} and evaluator.protocol == {}
    task, latency = evaluator.protocols["task"], evaluator.protocols["latency"]
    assert (task["kind"], task["split"], task["examples"], task["primary"]) == ("classification", "test", 5,
                                                                                  "accuracy")
    assert (latency["batch_size"], latency["batch_size_set"], latency["repeats"], latency["warmup"]) == (4, True, 2, 1)
    assert latency["tokens_per_example"] == 9  # the longest of the first four texts, padded to
    # Three outputs: macro F1 over the classes seen (0 and 1; nobody says 2) = (0 + 0.75) / 2.
    three = Evaluator(_recipe(classification, "sequence_classification"), tiny_tokenizer(), torch.device("cpu"))
    scores = three.measure(always(1, num_labels=3), "compressed", print)
    assert scores["macro_f1"] == pytest.approx(0.375) and "f1" not in scores


def test_measure_reuses_the_scores_of_the_last_quality_of_that_model(classification, monkeypatch):
    evaluator = Evaluator(_recipe(classification, "sequence_classification"), tiny_tokenizer(), torch.device("cpu"))
    calls = []
    scores = evaluator.encoder.scores
    monkeypatch.setattr(evaluator.encoder, "scores", lambda m: calls.append(m) or scores(m))
    model, other = always(1), always(0)
    known = evaluator.quality(model)  # the last stage row's
    metrics = evaluator.measure(model, "compressed", print, known=known)
    assert len(calls) == 1 and metrics["accuracy"] == known == pytest.approx(0.6) and metrics["f1"] == 0.75
    assert evaluator.measure(other, "base", print, known=known)["accuracy"] == pytest.approx(0.4)  # another model
    assert evaluator.measure(model, "base", print)["accuracy"] == known and len(calls) == 3  # no known: scored
    evaluator.quality(model)
    evaluator.quality(other)  # the last quality() scored another model: scored again
    assert evaluator.measure(model, "compressed", print, known=known)["f1"] == 0.75 and len(calls) == 6


def test_latency_batch_defaults_to_32_for_encoders(classification):
    unset = Evaluator(_recipe(classification, "sequence_classification"), tiny_tokenizer(), torch.device("cpu"))
    unset.measure(always(0), "base", print)
    assert (unset.protocols["latency"]["batch_size"], unset.protocols["latency"]["batch_size_set"]) == (32, False)
    one = Evaluator(_recipe(classification, "sequence_classification", {"batch_size": 1}), tiny_tokenizer(),
                    torch.device("cpu"))
    metrics = one.measure(always(0), "base", print)
    assert one.protocols["latency"]["batch_size"] == 1  # set explicitly: kept
    assert metrics["accuracy"] == pytest.approx(0.4)


def _hand_embedding(model, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state[0].mean(dim=0)


def _ranks(values: list[float]) -> torch.Tensor:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = torch.empty(len(values))
    ranks[torch.tensor(order)] = torch.arange(len(values), dtype=torch.float)
    return ranks


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def test_similarity_scores_match_a_hand_computation(similarity):
    tokenizer = tiny_tokenizer()
    evaluator = Evaluator(_recipe(similarity, "embedding"), tokenizer, torch.device("cpu"))
    assert evaluator.quality_name == "spearman"
    model = tiny_encoder()
    metrics = evaluator.measure(model, "base", print)
    rows = [json.loads(line) for line in open(similarity["source"])]
    cosines = [float(F.cosine_similarity(_hand_embedding(model, tokenizer, r["text"]),
                                         _hand_embedding(model, tokenizer, r["text_pair"]), dim=0)) for r in rows]
    gold = [r["score"] for r in rows]
    assert len(set(cosines)) == len(cosines)  # no ties: Spearman is Pearson of the ranks
    assert metrics["pearson"] == pytest.approx(_pearson(torch.tensor(cosines), torch.tensor(gold)), abs=1e-5)
    assert metrics["spearman"] == pytest.approx(_pearson(_ranks(cosines), _ranks(gold)), abs=1e-6)
    assert evaluator.quality(model) == pytest.approx(metrics["spearman"], abs=1e-6)
    assert evaluator.protocols["latency"]["batch_size"] == 32 and metrics["batch_ms"] > 0


def test_outputs_are_logits_else_last_hidden_state(classification, similarity, tiny_text):
    encoder_eval = Evaluator(_recipe(similarity, "embedding"), tiny_tokenizer(), torch.device("cpu"))
    model = tiny_encoder().train()  # outputs() runs in eval mode and gives the mode back
    inputs = encoder_eval.probe_inputs()
    assert inputs["input_ids"].shape[0] == 4  # the first four task texts, padded
    assert torch.equal(inputs["input_ids"], encoder_eval.encoder.batch(4)["input_ids"])
    assert "attention_mask" in inputs
    with torch.no_grad():
        expected = model.eval()(**inputs).last_hidden_state
    model.train()
    out = encoder_eval.outputs(model)
    assert model.training and out.shape == (4, inputs["input_ids"].shape[1], 64) and torch.equal(out, expected)
    classifier_eval = Evaluator(_recipe(classification, "sequence_classification"), tiny_tokenizer(),
                                torch.device("cpu"))
    assert torch.equal(classifier_eval.outputs(always(1)), torch.tensor([[0.0, 5.0]]).expand(4, 2))
    # A decoder: its logits on the first 64 evaluation tokens, as before.
    decoder_eval = Evaluator(Recipe.model_validate({
        "name": "t", "output": {"dir": "unused"},
        "evaluate": {"perplexity": {"data": {"source": str(tiny_text), "max_tokens": 100}, "window": 16, "stride": 8},
                     "latency": None, "macs": False, "memory": False},
    }), tiny_tokenizer(), torch.device("cpu"))
    llama = tiny_llama()
    assert decoder_eval.quality_name == "perplexity" and decoder_eval.has_quality
    assert decoder_eval.quality(llama) == decoder_eval.perplexity(llama)
    with torch.no_grad():
        assert torch.equal(decoder_eval.outputs(llama), llama(**decoder_eval.probe_inputs()).logits)


BASE = {"params": 1000, "size_bytes": 4_000_000, "accuracy": 0.9, "f1": 0.8, "matthews_corrcoef": 0.75,
        "batch_ms": 20.0, "examples_per_s": 1600.0, "load_seconds": 2.0}
COMPRESSED = {"params": 500, "size_bytes": 2_000_000, "accuracy": 0.81, "f1": 0.72, "matthews_corrcoef": 0.6,
              "batch_ms": 10.0, "examples_per_s": 3200.0, "load_seconds": 1.0, "compress_seconds": 12.5}
PROTOCOLS = {"task": {"kind": "classification", "dataset": "builtin:sentiment", "config": None, "split": "test",
                      "examples": 200, "max_length": 256, "batch_size": 32, "primary": "accuracy"},
             "latency": {"batch_size": 32, "repeats": 3, "warmup": 1, "tokens_per_example": 17, "split": "test",
                         "device": "cpu"}}


def test_report_card_and_compare_show_encoder_metrics():
    rows = {r[0]: r[1:] for r in comparison_rows(BASE, COMPRESSED)}
    assert list(rows) == ["params", "size on disk (MB)", "accuracy", "F1", "MCC", "latency per batch (ms)",
                          "examples/s", "load time (s)", "compression time (s)"]  # no perplexity or decode rows
    assert rows["accuracy"] == ["0.9000", "0.8100", "0.90x"]
    assert rows["latency per batch (ms)"] == ["20.00", "10.00", "0.50x"]
    assert rows["examples/s"] == ["1600.0", "3200.0", "2.00x"]
    assert "\nMCC                    | 0.7500 |     0.6000 | 0.80x\n" in format_table(BASE, COMPRESSED)
    # A decoder's table keeps its rows, measured or not.
    assert [r[0] for r in comparison_rows({"params": 1}, {"params": 1})][2:5] == ["perplexity", "decode tokens/s",
                                                                                "prefill ms"]
    text = render_report_md("enc", BASE, COMPRESSED, [{"stage": "0:prune_ffn", "seconds": 1.5, "params": 500,
                                                       "accuracy": 0.8}], {}, [], protocols=PROTOCOLS)
    assert "| stage | seconds | params after | accuracy after |" in text
    assert "| 0:prune_ffn | 1.5 | 500 | 0.8000 |" in text
    assert "| Spearman" not in text and "Perplexity protocol" not in text
    assert ("Task protocol: classification on builtin:sentiment split test, 200 examples, max_length 256, "
            "batch 32, primary metric accuracy") in text
    assert ("Latency protocol: batch of 32 examples of the test split, padded to 17 tokens, mean of 3 forwards "
            "after 1 warm-up, on cpu") in text
    manifest = {"name": "enc", "base_model": {"id": "builtin:minilm-l6"},
                "metrics": {"base": BASE, "compressed": COMPRESSED}, "evaluation": {"perplexity": {}, **PROTOCOLS}}
    card = model_card(manifest, "name: enc\n", architecture="BertForSequenceClassification")
    assert "| accuracy | 0.9000 | 0.8100 | 0.90x |" in card and "Task protocol: classification" in card
    assert "| perplexity |" not in card
    results = {r.metric_type: r for r in eval_results(manifest, "BertForSequenceClassification")}
    assert set(results) == {"accuracy", "f1", "matthews_corrcoef"}
    assert (results["accuracy"].metric_value, results["accuracy"].task_type, results["accuracy"].dataset_split) == (
        0.81, "text-classification", "test")
    for key in ("accuracy", "f1", "macro_f1", "matthews_corrcoef", "spearman", "pearson", "examples_per_s"):
        assert higher_is_better(key) is True, key
    assert higher_is_better("batch_ms") is False and higher_is_better("peak_ram_forward_mb") is False


def test_memory_of_an_encoder_loads_it_for_its_task(tmp_path, similarity):
    directory = model_dir(tiny_encoder(), tmp_path / "tiny-bert")
    recipe = _recipe(similarity, "embedding").model_copy(update={"model": ModelSpec(id=str(directory),
                                                                                    task="embedding")})
    evaluator = Evaluator(recipe, tiny_tokenizer(), torch.device("cpu"))
    measured = evaluator.memory(recipe.model, torch.device("cpu"))  # the base: its ModelSpec, as the engine passes
    assert set(measured) == {"peak_ram_load_mb", "peak_ram_forward_mb"}
    assert 0 < measured["peak_ram_load_mb"] <= measured["peak_ram_forward_mb"]
    assert evaluator.protocols["memory"]["batch_size"] == 32 and "forward" in evaluator.protocols["memory"]["how"]
