"""finetune pass: fine-tuning tiny random BERTs on synthetic tasks (written as local .jsonl files) raises the
train score, is deterministic under the seed, and leaves a frozen, independent copy as the teacher."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import WORDS, recipe_error, tiny_gpt2, tiny_tokenizer
from pydantic import ValidationError

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.task_eval import evaluate_classification, evaluate_similarity
from llmshrink.passes.configs.finetune import FinetuneConfig
from llmshrink.passes.finetune import apply, similarity_loss
from llmshrink.task_data import TaskSpec

# The cue word decides the class (or, for pairs, the group); the filler words carry nothing.
CUES = (("he", "she", "they", "his", "her"), ("it", "that", "this", "which", "what"))
FILLER = WORDS[40:80]


def bert(seed: int = 0, *, classes: int | None = 2, layers: int = 2, hidden: int = 32, heads: int = 4):
    """A tiny random BertForSequenceClassification (`classes` labels), or a bare BertModel (classes None)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, vocab_size=128, max_position_embeddings=64,
                        num_labels=classes or 2)
    return (BertForSequenceClassification(config) if classes else BertModel(config)).eval()


def sentence(rng: random.Random, cue: str) -> str:
    words = [rng.choice(FILLER) for _ in range(5)]
    return " ".join([cue, *words])


def classification_task(tmp_path, n: int = 64, *, pairs: bool = False, seed: int = 0) -> TaskSpec:
    """Label = the group of the first word (with pairs: of the second text's first word)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        row = {"text": sentence(rng, rng.choice(CUES[label if not pairs else rng.randrange(2)])), "label": label}
        if pairs:
            row["text_pair"] = sentence(rng, rng.choice(CUES[label]))
        rows.append(row)
    return write_task(tmp_path / "cls.jsonl", rows, "classification", text_pair="text_pair" if pairs else None)


def similarity_task(tmp_path, n: int = 64, seed: int = 0) -> TaskSpec:
    """Score 5 (4) for two texts of one group, 0 (1) for texts of different groups."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        same = i % 2 == 0
        first = rng.randrange(2)
        second = first if same else 1 - first
        rows.append({"text": sentence(rng, rng.choice(CUES[first])),
                     "text_pair": sentence(rng, rng.choice(CUES[second])),
                     "score": float(rng.choice([4, 5]) if same else rng.choice([0, 1]))})
    return write_task(tmp_path / "sim.jsonl", rows, "similarity")


def write_task(path, rows: list[dict], kind: str, **columns) -> TaskSpec:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TaskSpec(kind=kind, source=str(path), **columns)


def task_ctx(task: TaskSpec | None, teacher=None, seed: int = 0) -> Context:
    return Context(tokenizer=tiny_tokenizer(), task=task, teacher=teacher, seed=seed, log=lambda _: None)


def outputs(model, ctx: Context) -> torch.Tensor:
    batch = ctx.tokenizer([e.text for e in ctx.task_examples("train")[:8]], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


CFG = {"steps": 40, "batch_size": 16, "lr": 1e-3, "warmup_steps": 2}


def test_finetune_learns_classification_and_hands_over_a_frozen_independent_teacher(tmp_path):
    model = bert()
    ctx = task_ctx(classification_task(tmp_path), teacher=bert(seed=9))
    before = evaluate_classification(model, ctx.tokenizer, ctx.task_examples("train"))["accuracy"]
    record = apply(model, FinetuneConfig(**CFG), ctx)
    assert 0.3 <= before <= 0.7
    assert record["train_accuracy"] >= 0.95
    assert record["last_loss"] < 0.6 * record["first_loss"]
    assert {k: record[k] for k in ("task_kind", "steps", "examples", "examples_seen")} == {
        "task_kind": "classification", "steps": 40, "examples": 64, "examples_seen": 640}
    assert record["seconds"] > 0 and "curve" in record and "train_spearman" not in record
    # The teacher is the fine-tuned model, frozen, and a copy: training the model on leaves it alone.
    teacher = ctx.teacher
    assert teacher is not model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(p.requires_grad for p in model.parameters()) and not model.training
    assert torch.equal(outputs(teacher, ctx), outputs(model, ctx))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert not torch.equal(outputs(teacher, ctx), outputs(model, ctx))


def test_finetune_is_deterministic_and_tokenizes_text_pairs(tmp_path):
    task = classification_task(tmp_path, pairs=True)
    runs = []
    for _ in range(2):
        model = bert()
        record = apply(model, FinetuneConfig(**{**CFG, "steps": 8}), task_ctx(task))
        runs.append((record, model.state_dict()))
    (first, weights), (second, weights2) = runs
    assert first["curve"] == second["curve"] and first["last_loss"] == second["last_loss"]
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert first["last_loss"] != pytest.approx(first["first_loss"])


def test_an_interrupted_finetune_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import llmshrink.distill.trainer as trainer

    task, cfg = classification_task(tmp_path), FinetuneConfig(**{**CFG, "steps": 6, "save_every": 3})
    whole = bert()
    apply(whole, cfg.model_copy(update={"save_every": 0}), task_ctx(task))
    step, calls = trainer._micro_step, []

    def crash_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    ctx = task_ctx(task)
    ctx.work_dir = tmp_path / "work"
    monkeypatch.setattr(trainer, "_micro_step", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        apply(bert(), cfg, ctx)
    monkeypatch.setattr(trainer, "_micro_step", step)
    resumed, lines = bert(), []
    ctx.log = lines.append
    apply(resumed, cfg, ctx)
    assert any("finetune: resuming from step 3 of 6" in line for line in lines)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(),
                                                 strict=True))


def test_similarity_finetune_lowers_the_cosine_mse(tmp_path):
    model = bert(classes=None)
    ctx = task_ctx(similarity_task(tmp_path))
    examples = ctx.task_examples("train")
    loss_fn = similarity_loss(ctx.tokenizer, 128, 5.0)

    def cosine_mse() -> float:
        with torch.no_grad():
            return float(loss_fn(model.eval(), None, examples)[0])

    before, rho = cosine_mse(), evaluate_similarity(model, ctx.tokenizer, examples)["spearman"]
    record = apply(model, FinetuneConfig(**CFG), ctx)
    after = cosine_mse()
    assert after < 0.5 * before
    assert record["task_kind"] == "similarity" and record["max_score"] == 5.0
    assert record["train_spearman"] > 0.7 > rho + 0.3
    assert torch.equal(outputs(ctx.teacher, ctx), outputs(model, ctx))


def test_finetune_refusals_are_one_line(tmp_path):
    cfg = FinetuneConfig(steps=1)
    cls = classification_task(tmp_path)
    cases = [
        (bert(), task_ctx(None), r"^finetune: needs labeled examples: add a `task:` section to the recipe$"),
        (tiny_gpt2(), task_ctx(cls), "finetune: GPT2LMHeadModel is not a BERT-family encoder"),
        (bert(classes=None), task_ctx(cls), "finetune: a classification task needs a classifier head"),
        (bert(classes=1), task_ctx(cls), r"finetune: the task's train split has label 1, but the model's head has "
                                         r"1 classes \(0..0\)"),
        (bert(classes=None), task_ctx(similarity_task(tmp_path)), None),
    ]
    for model, ctx, message in cases[:-1]:
        with pytest.raises(LlmshrinkError, match=message) as err:
            apply(model, cfg, ctx)
        assert "\n" not in str(err.value)
    with pytest.raises(LlmshrinkError, match=r"^finetune.max_score: 2.0 is below the task's largest score 5.0;"):
        apply(cases[-1][0], FinetuneConfig(steps=1, max_score=2.0), cases[-1][1])
    with pytest.raises(ValidationError, match="seq_len\n  not used by this pass: texts are cut at max_length"):
        FinetuneConfig(steps=1, seq_len=64)


ENCODER_RECIPE = """\
name: t
model: {{id: some/dir, task: embedding}}
task: {{kind: similarity, source: 'builtin:similarity'}}
stages:
  - {stage}
output: {{dir: out/t}}
"""


@pytest.mark.parametrize("stage, message", [
    ("finetune: {steps: 2, seq_len: 64}",
     "stages[0].finetune.seq_len: not used by this pass: texts are cut at max_length, got 64"),
    ("finetune: {steps: 2, max_score: 0}", "stages[0].finetune.max_score: input should be greater than 0, got 0"),
    ("task_distill: {steps: 2, hidden_weight: -1}",
     "stages[0].task_distill.hidden_weight: input should be greater than or equal to 0, got -1"),
    ("task_distill: {steps: 2, temprature: 2}", "stages[0].task_distill.temprature: unknown key; allowed: steps"),
])
def test_bad_settings_are_one_recipe_error_line(tmp_path, stage, message):
    path = tmp_path / "r.yaml"
    text = recipe_error(path, ENCODER_RECIPE.format(stage=stage))
    assert text.startswith(f"{path}: {message}") and "\n" not in text
