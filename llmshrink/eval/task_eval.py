"""Task scores of an encoder: classification accuracy / F1 / MCC, and embedding similarity correlation.

Both run the model in eval mode without gradients, in batches padded to their longest text, and give the
model back in the mode it came in (an evaluation inside a training loop must not leave dropout off).
Sentence embeddings are the mean of the last hidden states over real tokens (padding left out), as
sentence-transformers pools all-MiniLM-L6-v2; similarity is their cosine, scored against gold scores with
Spearman's rho (the STS-B headline number) and Pearson's r.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.task_metrics import accuracy, f1_score, macro_f1, matthews_corrcoef, pearson, spearman
from llmshrink.task_data import Example

MAX_LENGTH = 256  # tokens per text; sentence-transformers' max_seq_length for all-MiniLM-L6-v2


def last_hidden(outputs) -> torch.Tensor:
    """The last hidden states: a bare encoder's last_hidden_state, else (a model with a head, run with
    output_hidden_states=True) its last hidden_states."""
    hidden = getattr(outputs, "last_hidden_state", None)
    return hidden if hidden is not None else outputs.hidden_states[-1]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, width): the mean of `hidden` (batch, seq, width) over positions where the mask is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # The clamp only matters for an all-padding row, which then pools to zeros instead of NaN.
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def sentence_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 32,
                        max_length: int = MAX_LENGTH) -> torch.Tensor:
    """(len(texts), hidden) float32 mean-pooled embeddings, on the CPU.

    A bare encoder (AutoModel) gives last_hidden_state; a model with a head (e.g. a sequence classifier)
    gives the same states as its last hidden_states, so a fine-tuned classifier's encoder can be scored too.
    """
    _check_batch(batch_size)
    chunks = []
    device = next(model.parameters()).device
    with evaluating(model):
        for start in range(0, len(texts), batch_size):
            batch = encode_texts(tokenizer, list(texts[start:start + batch_size]), None, max_length, device)
            outputs = model(**batch, output_hidden_states=True)
            chunks.append(mean_pool(last_hidden(outputs), batch["attention_mask"]).float().cpu())
    if not chunks:
        raise LlmshrinkError("task: no texts to embed")
    return torch.cat(chunks)


def evaluate_classification(model, tokenizer, examples: Sequence[Example], batch_size: int = 32,
                            max_length: int = MAX_LENGTH) -> dict[str, float | int]:
    """{"accuracy", "f1" (2 classes: of class 1) or "macro_f1" (more), "matthews_corrcoef", "examples"}
    of the argmax of a sequence classifier's logits (AutoModelForSequenceClassification-style)."""
    _check_batch(batch_size)
    if not examples:
        raise LlmshrinkError("task: no examples to evaluate")
    predictions: list[int] = []
    classes = None
    device = next(model.parameters()).device
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            pairs = [e.text_pair for e in chunk]
            batch = encode_texts(tokenizer, [e.text for e in chunk], pairs if pairs[0] is not None else None,
                            max_length, device)
            logits = model(**batch).logits
            classes = logits.shape[-1]
            predictions += logits.argmax(dim=-1).tolist()
    references = [int(e.label) for e in examples]
    outside = next((i for i, r in enumerate(references) if not 0 <= r < classes), None)
    if outside is not None:
        raise LlmshrinkError(f"task: example {outside} has label {references[outside]}, but the model "
                             f"predicts {classes} classes (0..{classes - 1})")
    scores: dict[str, float | int] = {"accuracy": accuracy(predictions, references)}
    if classes == 2:
        scores["f1"] = f1_score(predictions, references, positive=1)
    else:
        scores["macro_f1"] = macro_f1(predictions, references)
    scores["matthews_corrcoef"] = matthews_corrcoef(predictions, references)
    scores["examples"] = len(examples)
    return scores


def evaluate_similarity(model, tokenizer, examples: Sequence[Example], batch_size: int = 32,
                        max_length: int = MAX_LENGTH) -> dict[str, float | int]:
    """{"spearman", "pearson", "examples"}: the cosine of the two texts' embeddings against the gold scores."""
    if any(e.text_pair is None for e in examples):
        raise LlmshrinkError("task: similarity needs two texts per example (text_pair is missing)")
    first = sentence_embeddings(model, tokenizer, [e.text for e in examples], batch_size, max_length)
    second = sentence_embeddings(model, tokenizer, [e.text_pair for e in examples], batch_size, max_length)
    cosines = F.cosine_similarity(first, second, dim=-1).tolist()
    gold = [float(e.label) for e in examples]
    try:
        return {"spearman": spearman(cosines, gold), "pearson": pearson(cosines, gold), "examples": len(examples)}
    except ValueError as err:  # fewer than 2 examples, or constant scores: no correlation exists
        raise LlmshrinkError(f"task: {err}") from None


# --- helpers ---------------------------------------------------------------------------------------------


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise LlmshrinkError(f"task: batch_size: expected int >= 1, got {batch_size}")


def encode_texts(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """`texts` (and their `pairs`) as one batch padded to the longest, cut at max_length, on `device`."""
    batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


@contextmanager
def evaluating(model) -> Iterator[None]:
    """Eval mode and no gradients, and the model's own mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
