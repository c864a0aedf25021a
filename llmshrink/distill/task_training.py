"""Training an encoder on a task's labeled examples (the finetune and task_distill passes) with the loop every
distillation shares (distill.trainer.train: AdamW, warmup + cosine, progress bar, resumable state).

The trainer draws micro-batches of rows from a tensor; here each row stands for one example, and the loss
looks the examples up and tokenizes them (padded to the batch's longest). A row is one int64: the example's
index plus N times a hash of its content (N examples). The trainer hashes its rows into the settings a resumed
run must match, so a rerun on changed examples is refused instead of continuing on other data.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from llmshrink.distill.trainer import TrainResult, train
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.task_eval import last_hidden, mean_pool
from llmshrink.task_data import Example

# loss_fn(student, frozen teacher or None, the micro-batch's examples) -> (loss, detached parts for logging)
ExampleLoss = Callable[[nn.Module, nn.Module | None, list[Example]], tuple[torch.Tensor, dict]]


def example_rows(examples: Sequence[Example]) -> torch.Tensor:
    """(N, 1) int64 rows: index + N · (content hash mod 2**62 // N); index = row % N."""
    n = len(examples)
    if n == 0:
        raise LlmshrinkError("task: no training examples")
    span = 2**62 // n
    rows = []
    for index, e in enumerate(examples):
        digest = hashlib.blake2b(repr((e.text, e.text_pair, e.label)).encode(), digest_size=8).digest()
        rows.append(index + n * (int.from_bytes(digest, "little") % span))
    return torch.tensor(rows, dtype=torch.long).unsqueeze(1)


def train_on_examples(
    student: nn.Module, examples: Sequence[Example], loss_fn: ExampleLoss, options: dict, *,
    teacher: nn.Module | None = None, desc: str,
) -> TrainResult:
    """distill.trainer.train over the examples (TrainResult.tokens counts examples); `options` are
    TrainingConfig.trainer_options."""
    examples = list(examples)
    n = len(examples)

    def row_loss(model: nn.Module, frozen: nn.Module | None, rows: torch.Tensor):
        return loss_fn(model, frozen, [examples[i % n] for i in rows[:, 0].tolist()])

    return train(student, example_rows(examples), row_loss, **options, teacher=teacher, desc=desc)


def encode_examples(tokenizer, examples: Sequence[Example], max_length: int, device: torch.device, *,
                    as_pairs: bool) -> dict[str, torch.Tensor]:
    """Token tensors of the examples on `device`. as_pairs: one input per example, text and text_pair tokenized
    as a pair (a classifier's input); else one input per text: all texts, then all text_pairs (sentences to
    embed one by one)."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    if as_pairs:
        second = pairs if pairs[0] is not None else None
        batch = tokenizer(texts, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    else:
        texts += [p for p in pairs if p is not None]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def text_pieces(ids: torch.Tensor, tokenizer, max_length: int) -> list[Example]:
    """Unlabeled examples from a 1-D token stream: consecutive pieces that fill max_length with the special
    tokens ([CLS], [SEP]) added, decoded back to text (encode_examples tokenizes them again); the short tail
    is dropped."""
    size = max(1, max_length - tokenizer.num_special_tokens_to_add(pair=False))
    pieces = [ids[start:start + size].tolist() for start in range(0, len(ids) - size + 1, size)]
    if not pieces:
        raise LlmshrinkError(f"the unlabeled text has {len(ids)} tokens, fewer than one piece of {size} "
                             f"(max_length {max_length}); give more text or a smaller max_length")
    return [Example(text=tokenizer.decode(piece), text_pair=None, label=None) for piece in pieces]


def pooled(outputs, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers (and eval.task_eval) pool them: masked mean, float32."""
    return mean_pool(last_hidden(outputs), attention_mask).float()


def is_classifier(model: nn.Module) -> bool:
    """A sequence classifier (AutoModelForSequenceClassification's class for this config, or a subclass)."""
    import transformers

    config = getattr(model, "config", None)
    head = transformers.AutoModelForSequenceClassification._model_mapping.get(type(config), None) if config else None
    return isinstance(head, type) and isinstance(model, head)


def check_encoder(model: nn.Module, what: str) -> None:
    from llmshrink.encoders import is_encoder

    config = getattr(model, "config", None)
    if config is None or not is_encoder(config):
        raise LlmshrinkError(f"{what}: {type(model).__name__} is not a BERT-family encoder; {what} trains encoders "
                             "(model.task: sequence_classification or embedding) on a task:")


def frozen_copy(model: nn.Module) -> nn.Module:
    """An independent copy that cannot train: requires_grad off everywhere, eval mode."""
    return copy.deepcopy(model).requires_grad_(False).eval()
