"""finetune pass: train an encoder on the recipe's task (its train split), then make the fine-tuned model the
teacher, so that a later task_distill stage distils the compressed model from it. A recipe:

    - finetune: {steps: 500}
    - drop_layers: {...}
    - task_distill: {steps: 1000}

Classification (a model with a classifier head, model.task: sequence_classification): cross-entropy of the
logits (text and text_pair tokenized as a pair). Similarity: sentence-transformers' CosineSimilarityLoss, the
MSE between the cosine of the two texts' mean-pooled embeddings and score / max_score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmshrink.context import Context
from llmshrink.distill.curves import training_curve
from llmshrink.distill.task_training import (
    check_encoder,
    encode_examples,
    frozen_copy,
    is_classifier,
    pooled,
    train_on_examples,
)
from llmshrink.distill.training_modes import trainable_params
from llmshrink.errors import LlmshrinkError
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.finetune import FinetuneConfig
from llmshrink.task_data import Example


def apply(model: nn.Module, cfg: FinetuneConfig, ctx: Context) -> PassRecord:
    check_encoder(model, "finetune")
    if ctx.task is None:
        raise LlmshrinkError("finetune: needs labeled examples: add a `task:` section to the recipe")
    examples = ctx.task_examples("train")
    kind = ctx.task.kind
    if kind == "classification":
        loss_fn = classification_loss(ctx.tokenizer, cfg.max_length)
        _check_classes(model, examples)
    else:
        loss_fn = similarity_loss(ctx.tokenizer, cfg.max_length, cfg.max_score, is_classifier(model))
        _check_scores(examples, cfg.max_score)
    options = cfg.trainer_options("finetune", ctx)
    with trainable_params(model) as params:
        if not params:
            raise LlmshrinkError("finetune: the model has no trainable parameters")
        ctx.log(f"finetune: {cfg.steps} steps on {len(examples)} {kind} examples, "
                f"{sum(p.numel() for p in params):,} trainable params")
        result = train_on_examples(model, examples, loss_fn, options, desc="finetune")
    ctx.log(result.log_line("finetune: loss", unit="examples"))
    score = train_score(model, ctx.tokenizer, examples, kind, cfg.batch_size, cfg.max_length)
    # Later passes distil from the fine-tuned model: a copy, so that they change the model and not the teacher.
    ctx.teacher = frozen_copy(model)
    shown = "undefined (constant cosines)" if score is None else f"{score:.4f}"
    ctx.log(f"finetune: train {'accuracy' if kind == 'classification' else 'spearman'} {shown}; "
            "the fine-tuned model is now the teacher")
    summary = result.summary()
    record: PassRecord = {
        "task_kind": kind,
        "steps": result.steps,
        "examples": len(examples),
        "examples_seen": result.tokens,
        "seconds": summary["seconds"],
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "max_length": cfg.max_length,
        "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "curve": training_curve(result),
    }
    if kind == "classification":
        record["train_accuracy"] = score
    else:
        record |= {"train_spearman": score, "max_score": cfg.max_score}
    return record


def classification_loss(tokenizer, max_length: int):
    """Cross-entropy of the classifier's logits against the gold classes."""

    def loss_fn(student: nn.Module, _teacher, batch: list[Example]):
        device = next(student.parameters()).device
        inputs = encode_examples(tokenizer, batch, max_length, device, as_pairs=True)
        labels = torch.tensor([int(e.label) for e in batch], device=device)
        loss = F.cross_entropy(student(**inputs).logits.float(), labels)
        return loss, {"ce": loss.detach()}

    return loss_fn


def similarity_loss(tokenizer, max_length: int, max_score: float, head: bool = False):
    """CosineSimilarityLoss: MSE between cos(u, v) of the pooled embeddings and score / max_score. `head`: the
    model has a head (a classifier), so its encoder's states come only as hidden_states."""

    def loss_fn(student: nn.Module, _teacher, batch: list[Example]):
        device = next(student.parameters()).device
        inputs = encode_examples(tokenizer, batch, max_length, device, as_pairs=False)  # texts, then pairs
        outputs = student(**inputs, output_hidden_states=head)
        embeddings = pooled(outputs, inputs["attention_mask"])
        first, second = embeddings[: len(batch)], embeddings[len(batch):]
        target = torch.tensor([float(e.label) / max_score for e in batch], device=device)
        loss = F.mse_loss(F.cosine_similarity(first, second, dim=-1), target)
        return loss, {"cosine_mse": loss.detach()}

    return loss_fn


def train_score(model: nn.Module, tokenizer, examples: list[Example], kind: str, batch_size: int,
                max_length: int) -> float | None:
    """Train accuracy (classification) or Spearman's rho of the cosines (similarity), in eval mode; None where
    rho is undefined (constant cosines: collapsed embeddings), which must not throw the training away."""
    from llmshrink.eval.task_eval import evaluate_classification, evaluate_similarity

    if kind == "classification":
        return float(evaluate_classification(model, tokenizer, examples, batch_size, max_length)["accuracy"])
    try:
        return float(evaluate_similarity(model, tokenizer, examples, batch_size, max_length)["spearman"])
    except LlmshrinkError:
        return None


def _check_classes(model: nn.Module, examples: list[Example]) -> None:
    if not is_classifier(model):
        raise LlmshrinkError(f"finetune: a classification task needs a classifier head (model.task: "
                             f"sequence_classification); {type(model).__name__} has none")
    classes = int(model.config.num_labels)
    top = max(int(e.label) for e in examples)
    if top >= classes:
        raise LlmshrinkError(f"finetune: the task's train split has label {top}, but the model's head has "
                             f"{classes} classes (0..{classes - 1}); set model.num_labels")


def _check_scores(examples: list[Example], max_score: float) -> None:
    missing = next((i for i, e in enumerate(examples) if e.text_pair is None), None)
    if missing is not None:
        raise LlmshrinkError(f"finetune: similarity example {missing} has no text_pair; it compares two texts")
    top = max(abs(float(e.label)) for e in examples)
    if top > max_score:
        raise LlmshrinkError(f"finetune.max_score: {max_score} is below the task's largest score {top}; "
                             "the cosine target score / max_score must stay within [-1, 1]")
