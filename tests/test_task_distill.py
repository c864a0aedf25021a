"""task_distill pass (TinyBERT task distillation) on tiny random BERTs: zero loss for a student equal to its
teacher, the uniform layer map and width projection for a shallower, narrower student, the KL to the teacher
going down, and one-line refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibrated, n_params, stage_error
from pydantic import ValidationError
from test_finetune import bert, classification_task, similarity_task, task_ctx

from llmshrink.distill.task_training import example_rows, text_pieces
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.task_eval import evaluate_classification
from llmshrink.passes.configs.finetune import FinetuneConfig
from llmshrink.passes.configs.task_distill import TaskDistillConfig
from llmshrink.passes.finetune import apply as finetune
from llmshrink.passes.task_distill import apply
from llmshrink.registry import get_pass
from llmshrink.specs import DataSpec
from llmshrink.task_data import Example

CFG = {"steps": 40, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2}


def frozen(model):
    return copy.deepcopy(model).requires_grad_(False).eval()


@pytest.mark.parametrize("classes", [2, None], ids=["classifier", "embedding"])
def test_a_student_equal_to_its_teacher_starts_at_zero(tmp_path, classes):
    model = bert(classes=classes)
    task = classification_task(tmp_path) if classes else similarity_task(tmp_path)
    ctx = task_ctx(task, teacher=frozen(model))
    record = apply(model, TaskDistillConfig(steps=1, attention_weight=1.0, lr=1e-9), ctx)
    own = "prediction" if classes else "embedding"
    assert set(record["start"]) == {own, "hidden", "attention"}
    assert record["start"] == pytest.approx({own: 0.0, "hidden": 0.0, "attention": 0.0}, abs=1e-6)
    assert record["layer_map"] == [1, 2] and record["projection_params"] == 0
    assert record["weights"] == {own: 1.0, "hidden": 1.0, "attention": 1.0}
    assert record["measured_examples"] == 64 and record["examples"] == 64 and record["steps"] == 1
    assert model.config._attn_implementation == ctx.teacher.config._attn_implementation == "sdpa"  # switched back
    assert record["first_loss"] == pytest.approx(0.0, abs=1e-6)  # the student trains without dropout noise
    noisy = apply(model, TaskDistillConfig(steps=1, attention_weight=1.0, lr=1e-9, student_dropout=True), ctx)
    assert noisy["first_loss"] > 1e-4 and noisy["start"] == pytest.approx(record["start"], abs=1e-6)


def test_a_shallow_narrow_student_maps_layers_uniformly_and_learns_the_teacher(tmp_path):
    teacher = bert(seed=1, layers=4, hidden=64)
    model = bert(seed=2, layers=2, hidden=32)
    params, kind = n_params(model), type(model)
    ctx = task_ctx(classification_task(tmp_path), teacher=frozen(teacher))
    record = apply(model, TaskDistillConfig(**CFG, attention_weight=1.0), ctx)
    assert record["layer_map"] == [2, 4]
    assert (record["student_layers"], record["teacher_layers"]) == (2, 4)
    assert record["projection_params"] == 32 * 64 + 64  # one shared Linear(32, 64), TinyBERT's fit_dense
    assert n_params(model) == params and type(model) is kind  # the projection is dropped
    start, end = record["start"], record["end"]
    assert end["prediction"] < 0.5 * start["prediction"]  # KL(teacher || student) of the class distributions
    assert end["hidden"] < 0.5 * start["hidden"]
    assert record["last_loss"] < record["first_loss"]


def test_attention_distillation_alone_lowers_the_attention_mse(tmp_path):
    # Attention probabilities of random tiny BERTs are nearly uniform: the MSE is ~1e-5, hence the weight.
    ctx = task_ctx(classification_task(tmp_path), teacher=frozen(bert(seed=1, layers=4)))
    cfg = TaskDistillConfig(**CFG, prediction_weight=0.0, hidden_weight=0.0, attention_weight=1e4)
    record = apply(bert(seed=2, layers=2), cfg, ctx)
    assert set(record["start"]) == {"attention"}
    assert record["end"]["attention"] < 0.5 * record["start"]["attention"]


def test_finetune_then_task_distill_passes_on_the_task(tmp_path):
    """The recipe order: finetune makes the teacher, task_distill teaches a fresh shallower student from it."""
    big = bert(seed=1, layers=4)
    ctx = task_ctx(classification_task(tmp_path))
    finetune(big, FinetuneConfig(steps=40, batch_size=16, lr=1e-3, warmup_steps=2), ctx)
    assert ctx.teacher is not None
    student = bert(seed=3, layers=2)
    examples = ctx.task_examples("train")
    before = evaluate_classification(student, ctx.tokenizer, examples)["accuracy"]
    record = apply(student, TaskDistillConfig(**CFG, hidden_weight=0.0), ctx)
    after = evaluate_classification(student, ctx.tokenizer, examples)["accuracy"]
    assert before <= 0.7 and after >= 0.9
    assert record["end"]["prediction"] < 0.3 * record["start"]["prediction"]


def test_students_of_drop_layers_and_prune_heads(tmp_path):
    """The structural passes' students: layer counts from the config after drop_layers; prune_heads' fewer heads
    refuse attention_weight, and distil without it."""
    teacher = bert(seed=1, layers=4)
    ctx = calibrated()  # prune_heads reads calibration tokens
    ctx.tokenizer, ctx.task, ctx.teacher = task_ctx(None).tokenizer, classification_task(tmp_path), frozen(teacher)
    dropped = copy.deepcopy(teacher)
    drop = get_pass("drop_layers")
    drop.apply(dropped, drop.config_cls(layers=[1]), ctx)
    record = apply(dropped, TaskDistillConfig(**{**CFG, "steps": 10, "lr": 3e-4}, attention_weight=1.0), ctx)
    assert record["layer_map"] == [1, 3, 4] and record["student_layers"] == 3  # g(m) = m·4/3, rounded
    assert record["end"]["hidden"] < record["start"]["hidden"]
    pruned = copy.deepcopy(teacher)
    prune = get_pass("prune_heads")
    prune.apply(pruned, prune.config_cls(heads_per_layer=2), ctx)
    with pytest.raises(LlmshrinkError, match=r"^task_distill.attention_weight: student layer 1 has 2 attention "
                                             r"heads, teacher layer 1 4; .* set it to 0$"):
        apply(pruned, TaskDistillConfig(steps=1, attention_weight=1.0), ctx)
    record = apply(pruned, TaskDistillConfig(**{**CFG, "steps": 10, "lr": 3e-4}), ctx)
    assert record["end"]["hidden"] < record["start"]["hidden"]


@pytest.mark.parametrize("classes", [2, None], ids=["classifier", "embedding"])
def test_general_distillation_learns_the_teacher_on_unlabeled_text(tmp_path, tiny_text, classes, capfd):
    """text: data (TinyBERT's general distillation): pieces of the data: section's text, no labels, no task:."""
    ctx = task_ctx(None, teacher=frozen(bert(seed=1, layers=4, classes=classes)))
    ctx.data = DataSpec(source=str(tiny_text))
    ctx.tokenizer.model_max_length = 8  # below a document (a line of 12 words), as BERT's 512 is below a play
    assert len(ctx.train_token_ids()) > 8
    assert "Token indices sequence length" not in capfd.readouterr().err  # documents are cut later, on purpose
    cfg = TaskDistillConfig(**CFG, text="data", max_length=16, attention_weight=1e3)
    record = apply(bert(seed=2, layers=2, classes=classes), cfg, ctx)
    pieces = len(ctx.train_token_ids()) // 16  # the tiny tokenizer adds no special tokens: 16 tokens a piece
    assert record["text"] == "data" and record["examples"] == pieces > 64
    own = "prediction" if classes else "embedding"
    assert set(record["start"]) == {own, "hidden", "attention"}
    for term in record["start"]:
        assert record["end"][term] < 0.7 * record["start"][term], term
    examples = text_pieces(ctx.train_token_ids(), ctx.tokenizer, 16)
    assert [len(ctx.tokenizer(e.text)["input_ids"]) for e in examples[:5]] == [16] * 5
    assert {(e.text_pair, e.label) for e in examples} == {(None, None)}
    with pytest.raises(LlmshrinkError, match=r"^the unlabeled text has 3 tokens, fewer than one piece of 16 "):
        text_pieces(torch.arange(3), ctx.tokenizer, 16)


def test_example_rows_carry_the_index_and_the_content():
    examples = [Example("the a", None, 0), Example("of and", "to in", 1), Example("the a", None, 0)]
    rows = example_rows(examples)
    assert rows.shape == (3, 1) and (rows[:, 0] % 3).tolist() == [0, 1, 2]
    changed = example_rows([*examples[:2], Example("the a", None, 1)])
    assert torch.equal(changed[:2], rows[:2]) and changed[2] != rows[2]  # a resumed run sees the new label


def test_task_distill_is_deterministic(tmp_path):
    task = classification_task(tmp_path)
    runs = []
    for _ in range(2):
        model = bert(seed=2, layers=1, hidden=16, heads=2)
        runs.append((apply(model, TaskDistillConfig(**{**CFG, "steps": 5}), task_ctx(task, teacher=frozen(bert()))),
                     model.state_dict()))
    (first, a), (second, b) = runs
    assert first["curve"] == second["curve"] and first["end"] == second["end"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_task_distill_refusals_are_one_line(tmp_path):
    cls = classification_task(tmp_path)
    cfg = TaskDistillConfig(steps=1)
    cases = [
        (bert(), task_ctx(None, teacher=bert()), cfg, r"^task_distill: needs labeled examples: add a `task:` section to the recipe \(or learn on unlabeled text: "
         r"text: data\)$"),
        (bert(), task_ctx(cls), cfg, r"^task_distill: needs a teacher and none is loaded: put a finetune stage "),
        (bert(), task_ctx(cls, teacher=bert(classes=None)), cfg,
         r"^task_distill: the student \(BertForSequenceClassification\) is a classifier and the teacher "
         r"\(BertModel\) a bare encoder; they must be the same kind$"),
        (bert(layers=3), task_ctx(cls, teacher=bert()), cfg, r"^task_distill: the student has 3 layers, the teacher 2;"),
        (bert(classes=3), task_ctx(cls, teacher=bert()), cfg,
         r"^task_distill: the student predicts 3 classes, the teacher 2; they must score the same labels$"),
        # Fewer heads of the same width: what prune_heads leaves.
        (bert(layers=1, heads=2), task_ctx(cls, teacher=bert()), TaskDistillConfig(steps=1, attention_weight=1.0),
         r"^task_distill.attention_weight: student layer 1 has 2 attention heads, teacher layer 2 4; attention is "
         r"matched head by head \(pruned heads\?\): set it to 0$"),
        (bert(classes=None), task_ctx(cls, teacher=bert(classes=None)), TaskDistillConfig(steps=1, label_weight=1.0),
         r"^task_distill.label_weight: needs a classifier and a classification task; set it to 0$"),
        (bert(), task_ctx(cls, teacher=bert()),
         TaskDistillConfig(steps=1, prediction_weight=0.0, hidden_weight=0.0, embedding_weight=5.0),
         r"^task_distill: every loss weight that applies to this model is 0 \(prediction_weight, label_weight, "
         r"hidden_weight, attention_weight\); set one above 0$"),
    ]
    unlabeled = TaskDistillConfig(steps=1, text="data")
    cases += [
        (bert(), task_ctx(cls, teacher=bert()), unlabeled,
         r"^task_distill.text: data learns on the recipe's unlabeled text: add a `data:` section \(e.g. data: "),
    ]
    for model, ctx, config, message in cases:
        with pytest.raises(LlmshrinkError, match=message) as err:
            apply(model, config, ctx)
        assert "\n" not in str(err.value)
    assert stage_error("task_distill", {"steps": 1, "text": "data", "label_weight": 1.0}) == (
        ".label_weight: text: data is unlabeled text; set it to 0, got 1.0")
    with pytest.raises(ValidationError, match="seq_len\n  not used by this pass"):
        TaskDistillConfig(steps=1, seq_len=64)
