"""What the Evaluator measures of a BERT-family encoder (recipe model.task sequence_classification or embedding):
its task scores on the recipe's `task:` evaluation split, the latency of one forward over a batch of the task's
texts, MACs per token of one such forward, and the inputs of the reload check. No perplexity, no generation.

Metric keys (eval/report.py shows them, compare.py knows that higher is better for the scores):

    accuracy, f1 | macro_f1, matthews_corrcoef   classification (task_eval.evaluate_classification)
    spearman, pearson                            similarity (task_eval.evaluate_similarity)
    batch_ms        mean wall ms of model(**batch) over a padded batch of the task's texts
    examples_per_s  batch size / that mean time

The latency batch: `evaluate.latency.batch_size` examples when the recipe sets it, else ENCODER_BATCH_SIZE (32):
LatencySpec's default of 1 is a decoder's single prompt, and an encoder serves batches. prompt_tokens and
new_tokens do not apply to an encoder (the texts' own lengths, padded to the longest, do).
"""

from __future__ import annotations

import time

import torch

from llmshrink.eval.latency import sync_device
from llmshrink.eval.report import TASK_METRICS  # the task scores each kind gives, the primary one first
from llmshrink.eval.specs import LatencySpec
from llmshrink.eval.task_eval import (
    MAX_LENGTH,
    encode_texts,
    evaluate_classification,
    evaluate_similarity,
    evaluating,
)
from llmshrink.task_data import Example, TaskSpec, load_examples

ENCODER_BATCH_SIZE = 32  # latency batch when evaluate.latency.batch_size is not set
SCORE_BATCH_SIZE = 32  # batches of the task scoring (the scores do not depend on it)
PROBE_EXAMPLES = 4  # texts of the reload check


def latency_batch_size(latency: LatencySpec) -> int:
    """The encoder latency batch: the recipe's batch_size when it set one, else ENCODER_BATCH_SIZE."""
    return latency.batch_size if "batch_size" in latency.model_fields_set else ENCODER_BATCH_SIZE


class EncoderTask:
    """The task's evaluation split, loaded once, and the measurements made on it."""

    def __init__(self, task: TaskSpec, tokenizer, device: torch.device, max_length: int = MAX_LENGTH):
        self.task, self.tokenizer, self.device, self.max_length = task, tokenizer, device, max_length
        self.examples: list[Example] = load_examples(task)
        self.primary = TASK_METRICS[task.kind][0]

    @property
    def protocol(self) -> dict:
        """How the task scores are measured (evaluation.task in llmshrink.json)."""
        t = self.task
        return {"kind": t.kind, "dataset": t.source, "config": t.config, "split": t.split, "text": t.text,
                "text_pair": t.pair_column, "label": t.label_column, "examples": len(self.examples),
                "max_length": self.max_length, "batch_size": SCORE_BATCH_SIZE, "primary": self.primary,
                "how": ("argmax of the classifier's logits" if t.kind == "classification" else
                        "cosine of mean-pooled last hidden states vs the gold scores")}

    def scores(self, model) -> dict[str, float]:
        """The task metrics of `model` (TASK_METRICS of the kind), without the example count."""
        evaluate = evaluate_classification if self.task.kind == "classification" else evaluate_similarity
        result = evaluate(model, self.tokenizer, self.examples, SCORE_BATCH_SIZE, self.max_length)
        return {k: v for k, v in result.items() if k != "examples"}

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        """The first `size` examples (repeated when there are fewer) as one padded batch: text pairs for a
        classifier of pairs, else single texts (a similarity's texts and their pairs, interleaved)."""
        if self.task.kind == "classification":
            chosen = [self.examples[i % len(self.examples)] for i in range(size)]
            pairs = [e.text_pair for e in chosen] if chosen[0].text_pair is not None else None
            return encode_texts(self.tokenizer, [e.text for e in chosen], pairs, self.max_length, self.device)
        texts = [t for e in self.examples for t in (e.text, e.text_pair) if t is not None]
        return encode_texts(self.tokenizer, [texts[i % len(texts)] for i in range(size)], None, self.max_length,
                       self.device)

    def latency(self, model, latency: LatencySpec, warmup: int = 1) -> tuple[dict, dict]:
        """({"batch_ms", "examples_per_s"}, protocol): the mean of `repeats` timed forwards after `warmup`."""
        size = latency_batch_size(latency)
        batch = self.batch(size)
        device = batch["input_ids"].device
        seconds = []
        with evaluating(model):
            for i in range(warmup + latency.repeats):
                sync_device(device)
                start = time.perf_counter()
                model(**batch)
                sync_device(device)
                if i >= warmup:
                    seconds.append(time.perf_counter() - start)
        mean = sum(seconds) / len(seconds)
        protocol = {"batch_size": size, "batch_size_set": "batch_size" in latency.model_fields_set,
                    "repeats": latency.repeats, "warmup": warmup,
                    "tokens_per_example": int(batch["input_ids"].shape[1]), "max_length": self.max_length,
                    "split": self.task.split, "device": str(device),
                    "how": "mean wall time of one forward (no_grad, eval mode) over the first batch_size examples "
                           "of the split, padded to the longest"}
        return {"batch_ms": mean * 1000, "examples_per_s": size / mean}, protocol

    def macs(self, model, seq_len: int) -> tuple[dict, list[str]]:
        """({"macs_per_token"}, uncounted modules and ops): one forward over `seq_len` random tokens / seq_len."""
        from llmshrink.eval.macs import count_macs
        from llmshrink.eval.model_inputs import random_ids

        ids = random_ids(model, 1, seq_len, seed=0)
        counted = count_macs(model, input_ids=ids, attention_mask=torch.ones_like(ids))
        return ({"macs_per_token": counted["total"] / seq_len},
                list(map(str, counted["uncounted_modules"] + counted["uncounted_ops"])))

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        """A padded batch of the first PROBE_EXAMPLES examples: what the reload check runs."""
        return self.batch(min(PROBE_EXAMPLES, len(self.examples)))


@torch.no_grad()
def model_outputs(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of a model that has them (a classifier, an LM), else its last_hidden_state (a bare encoder)."""
    with evaluating(model):
        out = model(**inputs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state

