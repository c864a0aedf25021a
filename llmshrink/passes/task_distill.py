"""task_distill pass: TinyBERT's task distillation (Jiao et al. 2020) of an encoder from the teacher, on the
recipe's task (its train split). The teacher is ctx.teacher: the fine-tuned model when a finetune stage ran
before, else the model as loaded. The student is the (compressed) model; loss =

    prediction_weight · KL(teacher || student) of the class distributions at temperature (classifiers)
  + label_weight · cross-entropy with the gold labels (classifiers)
  + embedding_weight · MSE of the mean-pooled sentence embeddings (bare encoders: embedding models)
  + hidden_weight · MSE of hidden states, mean over the embeddings (0 -> 0) and each student layer m -> teacher
    layer g(m) = m·N/M (distill.tinybert_losses.uniform_layer_map)
  + attention_weight · MSE of the attention probabilities, mean over the mapped layers.

With text: data the student learns on unlabeled text instead (pieces of the recipe's data: section, no labels):
TinyBERT's general distillation, from the teacher ctx holds at that point.

The prediction term is tinybert_losses.prediction_loss (soft cross-entropy) less the teacher's entropy: the
same gradient, and 0 for a student that matches the teacher. When widths differ, a learned projection
(HiddenProjection) maps the student's states to the teacher's; it trains with the student and is dropped.
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
    is_classifier,
    pooled,
    text_pieces,
    train_on_examples,
)
from llmshrink.distill.tinybert_losses import (
    HiddenProjection,
    attention_loss,
    hidden_loss,
    prediction_loss,
    uniform_layer_map,
)
from llmshrink.distill.training_modes import eager_attention, trainable_params
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.task_eval import last_hidden, mean_pool
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.task_distill import TaskDistillConfig
from llmshrink.task_data import Example

MEASURED = 64  # the first examples of the train split, on which the start and end losses are measured


class TaskStudent(nn.Module):
    """The student and the projection of its hidden states to the teacher's width (None: same width), one module
    so that the trainer optimises both. forward returns (output, {hidden-state index: projected state})."""

    def __init__(self, model: nn.Module, projection: HiddenProjection | None, indices: list[int], dropout: bool):
        super().__init__()
        self.model, self.projection, self.indices, self.dropout = model, projection, indices, dropout

    def train(self, mode: bool = True) -> TaskStudent:
        super().train(mode)
        if not self.dropout:
            self.model.eval()  # eval mode only turns dropout off in BERT; gradients still flow
        return self

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        if self.projection is None:
            return out, {}
        states = out.hidden_states  # None when only the embedding term (the last layer's states) needs them
        return out, {m: self.projection(states[m] if states is not None else last_hidden(out), m)
                     for m in self.indices}


def apply(model: nn.Module, cfg: TaskDistillConfig, ctx: Context) -> PassRecord:
    check_encoder(model, "task_distill")
    examples = _examples(cfg, ctx)
    teacher = ctx.teacher
    if teacher is None:
        raise LlmshrinkError("task_distill: needs a teacher and none is loaded: put a finetune stage before it")
    classifier = is_classifier(model)
    if classifier != is_classifier(teacher):
        kinds = {True: "a classifier", False: "a bare encoder"}
        raise LlmshrinkError(f"task_distill: the student ({type(model).__name__}) is {kinds[classifier]} and the "
                             f"teacher ({type(teacher).__name__}) {kinds[not classifier]}; they must be the same kind")
    weights = _weights(cfg, classifier, ctx)
    s_layers, t_layers = int(model.config.num_hidden_layers), int(teacher.config.num_hidden_layers)
    if s_layers > t_layers:
        raise LlmshrinkError(f"task_distill: the student has {s_layers} layers, the teacher {t_layers}; "
                             "each student layer needs its own teacher layer")
    mapping = uniform_layer_map(s_layers, t_layers)
    pairs = [(0, 0), *enumerate(mapping, 1)]
    device = next(model.parameters()).device
    teacher.to(device)

    def run(student: nn.Module, frozen: nn.Module, batch: list[Example]) -> dict[str, torch.Tensor]:
        inputs = encode_examples(ctx.tokenizer, batch, cfg.max_length, device, as_pairs=classifier)
        flags = {"output_hidden_states": "hidden" in weights, "output_attentions": "attention" in weights}
        s_out, projected = student(**inputs, **flags)
        t_out = frozen(**inputs, **flags)
        labels = torch.tensor([int(e.label) for e in batch], device=device) if "label" in weights else None
        return _components(s_out, projected, t_out, inputs["attention_mask"], labels, weights, pairs, cfg.temperature)

    def loss_fn(student: nn.Module, frozen: nn.Module | None, batch: list[Example]):
        assert frozen is not None
        parts = run(student, frozen, batch)
        total = sum(weights[k] * v for k, v in parts.items())
        return total, {**{k: v.detach() for k, v in parts.items()}, "loss": total.detach()}

    with eager_attention([model, teacher] if "attention" in weights else [], "task_distill"):
        projection = _projection(model, teacher, examples[:2], cfg, ctx, weights, pairs, classifier)
        indices = [m for m, _ in pairs] if "hidden" in weights else []
        needed = sorted({*indices, *([s_layers] if "embedding" in weights else [])})
        student = TaskStudent(model, projection, needed, cfg.student_dropout)
        measured = examples[:MEASURED]
        start = _measure(run, student, teacher, measured, cfg.batch_size)
        with trainable_params(model) as params:
            if not params:
                raise LlmshrinkError("task_distill: the model has no trainable parameters")
            extra = sum(p.numel() for p in projection.parameters()) if projection is not None else 0
            what = "examples" if cfg.text == "task" else f"pieces of unlabeled text ({cfg.max_length} tokens)"
            ctx.log(f"task_distill: {cfg.steps} steps on {len(examples)} {what}, layer map {mapping}, "
                    f"{sum(p.numel() for p in params):,} trainable params"
                    + (f" + {extra:,} projection params" if extra else ""))
            result = train_on_examples(student, examples, loss_fn, cfg.trainer_options("task_distill", ctx),
                                       teacher=teacher, desc="task_distill")
        end = _measure(run, student, teacher, measured, cfg.batch_size)
    ctx.log(result.log_line("task_distill: loss", unit="examples"))
    ctx.log("task_distill: " + ", ".join(f"{k} {start[k]:.4f} -> {end[k]:.4f}" for k in start))
    return {
        "text": cfg.text,
        "steps": result.steps,
        "examples": len(examples),
        "examples_seen": result.tokens,
        "seconds": result.summary()["seconds"],
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "weights": weights,
        "temperature": cfg.temperature,
        "student_dropout": cfg.student_dropout,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "max_length": cfg.max_length,
        "student_layers": s_layers,
        "teacher_layers": t_layers,
        "layer_map": mapping,
        "projection_params": extra,
        "measured_examples": len(measured),
        "start": start,
        "end": end,
        "curve": training_curve(result),
    }


def _examples(cfg: TaskDistillConfig, ctx: Context) -> list[Example]:
    """What the student learns on: the task's train split, or (text: data) pieces of the data: section's text."""
    if cfg.text == "task":
        if ctx.task is None:
            raise LlmshrinkError("task_distill: needs labeled examples: add a `task:` section to the recipe "
                                 "(or learn on unlabeled text: text: data)")
        return ctx.task_examples("train")
    if ctx.data is None:
        raise LlmshrinkError("task_distill.text: data learns on the recipe's unlabeled text: add a `data:` section "
                             "(e.g. data: {source: builtin:shakespeare})")
    return text_pieces(ctx.train_token_ids(), ctx.tokenizer, cfg.max_length)


def _weights(cfg: TaskDistillConfig, classifier: bool, ctx: Context) -> dict[str, float]:
    """The loss terms that apply to this kind of model, with their weights (those > 0)."""
    if cfg.label_weight > 0 and not (classifier and ctx.task is not None and ctx.task.kind == "classification"):
        raise LlmshrinkError("task_distill.label_weight: needs a classifier and a classification task; set it to 0")
    own = {"prediction": cfg.prediction_weight, "label": cfg.label_weight} if classifier else {
        "embedding": cfg.embedding_weight}
    weights = {k: w for k, w in {**own, "hidden": cfg.hidden_weight, "attention": cfg.attention_weight}.items()
               if w > 0}
    if not weights:
        names = ", ".join(f"{k}_weight" for k in [*own, "hidden", "attention"])
        raise LlmshrinkError(f"task_distill: every loss weight that applies to this model is 0 ({names}); "
                             "set one above 0")
    return weights


def _projection(model: nn.Module, teacher: nn.Module, probe: list[Example], cfg: TaskDistillConfig, ctx: Context,
                weights: dict[str, float], pairs: list[tuple[int, int]], classifier: bool) -> HiddenProjection | None:
    """Check the models against each other on a probe batch (classes, attention heads), and make the projection
    the hidden and embedding terms need when the widths differ (seeded, without moving the global RNG)."""
    device = next(model.parameters()).device
    inputs = encode_examples(ctx.tokenizer, probe, cfg.max_length, device, as_pairs=classifier)
    flags = {"output_hidden_states": True, "output_attentions": "attention" in weights}
    with torch.no_grad():
        s_out, t_out = model.eval()(**inputs, **flags), teacher.eval()(**inputs, **flags)
    if classifier and s_out.logits.shape != t_out.logits.shape:
        raise LlmshrinkError(f"task_distill: the student predicts {s_out.logits.shape[-1]} classes, the teacher "
                             f"{t_out.logits.shape[-1]}; they must score the same labels")
    if "attention" in weights:
        for m, g in pairs[1:]:
            s_heads, t_heads = s_out.attentions[m - 1].shape[1], t_out.attentions[g - 1].shape[1]
            if s_heads != t_heads:
                raise LlmshrinkError(
                    f"task_distill.attention_weight: student layer {m} has {s_heads} attention heads, teacher "
                    f"layer {g} {t_heads}; attention is matched head by head (pruned heads?): set it to 0")
    s_width, t_width = s_out.hidden_states[0].shape[-1], t_out.hidden_states[0].shape[-1]
    if s_width == t_width or not ({"hidden", "embedding"} & set(weights)):
        return None
    ref = next(p for p in model.parameters() if p.is_floating_point())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        projection = HiddenProjection(s_width, t_width, len(pairs) - 1)
    return projection.to(device=ref.device, dtype=ref.dtype)


def _components(s_out, projected: dict[int, torch.Tensor], t_out, mask: torch.Tensor, labels: torch.Tensor | None,
                weights: dict[str, float], pairs: list[tuple[int, int]], temperature: float) -> dict[str, torch.Tensor]:
    """Each weighted loss term, unweighted."""
    parts: dict[str, torch.Tensor] = {}
    if "prediction" in weights:
        s_logits, t_logits = s_out.logits, t_out.logits
        parts["prediction"] = (prediction_loss(s_logits, t_logits, temperature)
                               - prediction_loss(t_logits, t_logits, temperature))  # less the teacher's entropy
    if labels is not None:
        parts["label"] = F.cross_entropy(s_out.logits.float(), labels)
    if "embedding" in weights:
        last = len(pairs) - 1
        s_emb = mean_pool(projected.get(last, last_hidden(s_out)), mask).float()
        parts["embedding"] = F.mse_loss(s_emb, pooled(t_out, mask))
    if "hidden" in weights:
        parts["hidden"] = torch.stack([
            hidden_loss(projected.get(m, s_out.hidden_states[m]), t_out.hidden_states[g], mask) for m, g in pairs
        ]).mean()
    if "attention" in weights:
        parts["attention"] = torch.stack([
            attention_loss(s_out.attentions[m - 1], t_out.attentions[g - 1], mask) for m, g in pairs[1:]
        ]).mean()
    return parts


def _measure(run, student: nn.Module, teacher: nn.Module, examples: list[Example], batch_size: int) -> dict:
    """Each loss term in eval mode (no dropout), averaged over `examples`."""
    totals: dict[str, float] = {}
    student.eval()
    teacher.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            for k, v in run(student, teacher, chunk).items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
    return {k: v / len(examples) for k, v in totals.items()}
