"""Task metrics for fine-tuned encoders (GLUE-style classification and regression, SQuAD-style QA).

Pure functions in plain Python, so every number can be checked by hand and nothing pulls in
scikit-learn (not a dependency of llmshrink; lm-eval brings it in, but its presence is not promised).
Each metric returns a float in the units of the usual reference implementation (sklearn / scipy /
the official SQuAD v1.1 script) except that SQuAD scores are fractions in [0, 1], not percentages.
Inputs are sequences or 1-D tensors, `predictions` first; bad inputs raise a one-line ValueError.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import torch

Values = Sequence[Any] | torch.Tensor


def accuracy(predictions: Values, references: Values) -> float:
    """Fraction of predictions equal to their reference."""
    preds, refs = _pair("accuracy", predictions, references)
    return sum(p == r for p, r in zip(preds, refs, strict=True)) / len(preds)


def f1_score(predictions: Values, references: Values, positive: Hashable = 1) -> float:
    """Binary F1 of the `positive` label (MRPC, QQP): 2·TP / (2·TP + FP + FN), 0 when that is 0/0.

    More than two labels raise (as sklearn's average="binary" does): binary F1 would quietly lump
    the other classes together; use macro_f1 for them.
    """
    preds, refs = _pair("f1", predictions, references)
    classes = set(preds) | set(refs)
    if len(classes) > 2:
        raise ValueError(f"f1: {len(classes)} classes found; binary F1 needs at most two, use macro_f1")
    return _class_f1(preds, refs, positive)


def macro_f1(predictions: Values, references: Values) -> float:
    """Unweighted mean of the per-class F1 over every label seen in either input (sklearn's "macro")."""
    preds, refs = _pair("macro_f1", predictions, references)
    classes = set(preds) | set(refs)
    return sum(_class_f1(preds, refs, c) for c in classes) / len(classes)


def matthews_corrcoef(predictions: Values, references: Values) -> float:
    """Matthews correlation (CoLA), binary or multiclass: Gorodkin's R_K over the confusion matrix.

    With c correct out of s, p_k predictions and t_k references of class k:
    (c·s - Σ p_k·t_k) / sqrt((s² - Σ p_k²)·(s² - Σ t_k²)); for two classes this is the familiar
    (TP·TN - FP·FN) / sqrt(...). A zero denominator (a constant input) gives 0.0, as sklearn does,
    so a model that always answers one class scores 0 instead of failing the evaluation.
    """
    preds, refs = _pair("matthews_corrcoef", predictions, references)
    s = len(preds)
    c = sum(p == r for p, r in zip(preds, refs, strict=True))
    p_counts, t_counts = Counter(preds), Counter(refs)
    pt = sum(p_counts[k] * t_counts[k] for k in p_counts)
    pp = sum(n * n for n in p_counts.values())
    tt = sum(n * n for n in t_counts.values())
    denominator = (s * s - pp) * (s * s - tt)  # exact integers: no rounding before the one sqrt
    if denominator == 0:
        return 0.0
    return (c * s - pt) / math.sqrt(denominator)


def pearson(predictions: Values, references: Values) -> float:
    """Pearson's r (STS-B); a constant input raises, since r is undefined there."""
    xs, ys = _numeric_pair("pearson", predictions, references)
    return _pearson(xs, ys)


def spearman(predictions: Values, references: Values) -> float:
    """Spearman's rho: Pearson's r of the ranks, ties taking their average rank (as scipy does)."""
    xs, ys = _numeric_pair("spearman", predictions, references)
    return _pearson(average_ranks(xs), average_ranks(ys))


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, each run of equal values sharing the mean of the ranks it spans."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1  # mean of the 1-based ranks start+1 .. end+1
        start = end + 1
    return ranks


# --- SQuAD v1.1 -------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation, in its order: lowercase, drop ASCII punctuation,
    drop the articles a / an / the (whole words), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0."""
    golds = _golds("exact_match", gold_answers)
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(gold) for gold in golds))


def squad_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """Best token-overlap F1 over the gold answers (bags of normalised whitespace tokens).

    As in v1.1 (not v2.0), an answer that normalises to nothing shares no token, so scores 0.
    """
    golds = _golds("squad_f1", gold_answers)
    return max(_token_f1(prediction, gold) for gold in golds)


def squad_scores(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"}: the means over questions (the official script's values divided by 100)."""
    if isinstance(predictions, str) or len(predictions) == 0:
        raise ValueError("squad: predictions must be a non-empty list of strings")
    if len(predictions) != len(gold_answers):
        raise ValueError(f"squad: {len(predictions)} predictions but {len(gold_answers)} gold answer lists")
    n = len(predictions)
    return {
        "exact_match": sum(exact_match(p, g) for p, g in zip(predictions, gold_answers, strict=True)) / n,
        "f1": sum(squad_f1(p, g) for p, g in zip(predictions, gold_answers, strict=True)) / n,
    }


# --- helpers ----------------------------------------------------------------------------------


def _as_list(metric: str, values: Values) -> list[Any]:
    if isinstance(values, torch.Tensor):
        if values.ndim != 1:
            raise ValueError(f"{metric}: expected a 1-D tensor, got shape {tuple(values.shape)}")
        return values.tolist()
    return list(values)


def _pair(metric: str, predictions: Values, references: Values) -> tuple[list[Any], list[Any]]:
    """Both inputs as lists, after checking that they are non-empty and of equal length."""
    preds, refs = _as_list(metric, predictions), _as_list(metric, references)
    if not preds or not refs:
        raise ValueError(f"{metric}: empty input ({len(preds)} predictions, {len(refs)} references)")
    if len(preds) != len(refs):
        raise ValueError(f"{metric}: {len(preds)} predictions but {len(refs)} references")
    return preds, refs


def _numeric_pair(metric: str, predictions: Values, references: Values) -> tuple[list[float], list[float]]:
    """Floats, at least two each, neither constant (a correlation needs spread on both sides)."""
    preds, refs = _pair(metric, predictions, references)
    if len(preds) < 2:
        raise ValueError(f"{metric}: needs at least 2 pairs, got 1")
    xs, ys = [float(p) for p in preds], [float(r) for r in refs]
    for name, values in (("predictions", xs), ("references", ys)):
        if any(math.isnan(v) for v in values):
            raise ValueError(f"{metric}: {name} contain NaN")
        if min(values) == max(values):  # exact test: a float mean of equal values need not equal them
            raise ValueError(f"{metric}: {name} are constant; correlation is undefined")
    return xs, ys


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    mean_x, mean_y = math.fsum(xs) / n, math.fsum(ys) / n
    dx = [x - mean_x for x in xs]
    dy = [y - mean_y for y in ys]
    cov = math.fsum(a * b for a, b in zip(dx, dy, strict=True))
    r = cov / math.sqrt(math.fsum(a * a for a in dx) * math.fsum(b * b for b in dy))
    return max(-1.0, min(1.0, r))  # rounding may step just outside [-1, 1]


def _class_f1(preds: Sequence[Any], refs: Sequence[Any], label: Hashable) -> float:
    tp = sum(p == label and r == label for p, r in zip(preds, refs, strict=True))
    predicted = sum(p == label for p in preds)
    actual = sum(r == label for r in refs)
    return 2 * tp / (predicted + actual) if predicted + actual else 0.0  # 2TP+FP+FN = predicted + actual


def _golds(metric: str, gold_answers: Sequence[str]) -> Sequence[str]:
    if isinstance(gold_answers, str):  # one answer passed bare would be read as its characters
        raise ValueError(f"{metric}: gold_answers must be a list of strings, got one string")
    if len(gold_answers) == 0:
        raise ValueError(f"{metric}: no gold answers")
    return gold_answers


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)
