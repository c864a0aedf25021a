"""Task metrics against hand-worked confusion matrices, ties, SQuAD normalisation examples, and (where
they are installed) sklearn / scipy on random inputs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from llmshrink.eval.task_metrics import (
    accuracy,
    average_ranks,
    exact_match,
    f1_score,
    macro_f1,
    matthews_corrcoef,
    normalize_answer,
    pearson,
    spearman,
    squad_f1,
    squad_scores,
)

# Binary, positive = 1:      reference 1   reference 0
#   predicted 1                 TP = 3       FP = 1
#   predicted 0                 FN = 1       TN = 1
BIN_REFS = [1, 1, 1, 1, 0, 0]
BIN_PREDS = [1, 1, 1, 0, 0, 1]

# Three classes (rows = reference, columns = prediction):
#        0  1  2
#   0  [ 1  1  0 ]
#   1  [ 0  2  0 ]
#   2  [ 1  0  1 ]
MC_REFS = [0, 0, 1, 1, 2, 2]
MC_PREDS = [0, 1, 1, 1, 2, 0]


def test_binary_confusion_matrix_by_hand():
    assert accuracy(BIN_PREDS, BIN_REFS) == pytest.approx(4 / 6)
    # F1(1) = 2·3 / (2·3 + 1 + 1) = 0.75; F1(0) = 2·1 / (2·1 + 1 + 1) = 0.5
    assert f1_score(BIN_PREDS, BIN_REFS) == pytest.approx(0.75)
    assert f1_score(BIN_PREDS, BIN_REFS, positive=0) == pytest.approx(0.5)
    assert macro_f1(BIN_PREDS, BIN_REFS) == pytest.approx(0.625)
    # (TP·TN - FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (3 - 1) / sqrt(4·4·2·2) = 0.25
    assert matthews_corrcoef(BIN_PREDS, BIN_REFS) == pytest.approx(0.25)


def test_multiclass_confusion_matrix_by_hand():
    assert accuracy(MC_PREDS, MC_REFS) == pytest.approx(4 / 6)
    # Per class 2·TP / (predicted + actual): 0: 2/4, 1: 4/5, 2: 2/3 -> mean 59/90
    assert macro_f1(MC_PREDS, MC_REFS) == pytest.approx(59 / 90)
    # R_K: s = 6, c = 4, p = (2, 3, 1), t = (2, 2, 2): Σp·t = 12, Σp² = 14, Σt² = 12
    # (4·6 - 12) / sqrt((36 - 14)(36 - 12)) = 12 / sqrt(528)
    assert matthews_corrcoef(MC_PREDS, MC_REFS) == pytest.approx(12 / math.sqrt(528))


def test_metric_edge_cases():
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant predictions: 0, as sklearn
    assert matthews_corrcoef([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0], [0, 1]) == pytest.approx(-1.0)
    assert f1_score([0, 0], [0, 0]) == 0.0  # no positive anywhere: 0/0 -> 0
    assert macro_f1([0, 0], [0, 1]) == pytest.approx((2 / 3 + 0.0) / 2)
    assert macro_f1(["pos", "neg"], ["pos", "neg"]) == 1.0  # any hashable labels
    assert accuracy(torch.tensor([1, 0, 2]), torch.tensor([1, 1, 2])) == pytest.approx(2 / 3)


@pytest.mark.parametrize("call, message", [
    (lambda: accuracy([], []), "accuracy: empty input (0 predictions, 0 references)"),
    (lambda: f1_score([1, 0], [1]), "f1: 2 predictions but 1 references"),
    (lambda: f1_score([0, 1, 2], [0, 1, 1]), "f1: 3 classes found; binary F1 needs at most two, use macro_f1"),
    (lambda: matthews_corrcoef([1], []), "matthews_corrcoef: empty input (1 predictions, 0 references)"),
    (lambda: pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), "pearson: predictions are constant; correlation is undefined"),
    (lambda: spearman([1, 2, 3], [4, 4, 4]), "spearman: references are constant; correlation is undefined"),
    (lambda: pearson([1.0], [2.0]), "pearson: needs at least 2 pairs, got 1"),
    (lambda: pearson([1.0, float("nan")], [1.0, 2.0]), "pearson: predictions contain NaN"),
    (lambda: accuracy(torch.zeros(2, 2), torch.zeros(2, 2)), "accuracy: expected a 1-D tensor, got shape (2, 2)"),
    (lambda: exact_match("a", "a"), "exact_match: gold_answers must be a list of strings, got one string"),
    (lambda: squad_f1("a", []), "squad_f1: no gold answers"),
    (lambda: squad_scores(["a"], [["a"], ["b"]]), "squad: 1 predictions but 2 gold answer lists"),
])
def test_bad_inputs_raise_one_line_value_errors(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message


def test_pearson_and_spearman_by_hand():
    # x = (1, 2, 3), y = (1, 2, 4): dx = (-1, 0, 1), dy = (-4/3, -1/3, 5/3); cov 3, ssx 2, ssy 14/3
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 14 / 3))
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    # Monotone but not linear: Spearman 1, Pearson below 1.
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99


def test_spearman_uses_average_ranks_for_ties():
    assert average_ranks([10, 20, 20, 20, 5]) == [2.0, 4.0, 4.0, 4.0, 1.0]
    assert average_ranks([3.0, 3.0]) == [1.5, 1.5]
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): cov 4.5, ssx 4.5, ssy 5 -> sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))


@pytest.mark.parametrize("text, normalized", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("an apple, a day", "apple day"),
    ("Theater of Anatomy", "theater of anatomy"),  # articles only as whole words
    ("the-end", "theend"),  # punctuation goes first and leaves no space, so "the" is no longer a word
    ("A.B.C.", "abc"),
    ("  Hello\tWorld \n", "hello world"),
    ("¡Olé!", "¡olé"),  # only ASCII punctuation, as in the official script
])
def test_squad_normalization(text, normalized):
    assert normalize_answer(text) == normalized


def test_squad_exact_match_and_f1():
    assert exact_match("the Eiffel tower", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # pred (in, paris, france) vs (paris): P 1/3, R 1 -> 0.5; vs (capital, of, france): 1/3 -> max 0.5
    assert squad_f1("in Paris, France", ["Paris", "the capital of France"]) == pytest.approx(0.5)
    # Bags, not sets: (cat, cat, cat) vs (cat, cat, dog) share 2 -> P = R = 2/3
    assert squad_f1("the cat cat cat", ["cat cat dog"]) == pytest.approx(2 / 3)
    # v1.1: an answer that normalises to nothing matches exactly but shares no token.
    assert exact_match("", ["the"]) == 1.0 and squad_f1("", ["the"]) == 0.0
    scores = squad_scores(["Paris", "in Paris, France"], [["Paris"], ["Paris"]])
    assert scores == pytest.approx({"exact_match": 0.5, "f1": 0.75})


def test_agrees_with_sklearn_and_scipy_on_random_inputs():
    metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for classes in (2, 3, 5):
        refs = [rng.randrange(classes) for _ in range(200)]
        preds = [r if rng.random() < 0.6 else rng.randrange(classes) for r in refs]
        assert matthews_corrcoef(preds, refs) == pytest.approx(metrics.matthews_corrcoef(refs, preds))
        assert macro_f1(preds, refs) == pytest.approx(metrics.f1_score(refs, preds, average="macro"))
        if classes == 2:
            assert f1_score(preds, refs) == pytest.approx(metrics.f1_score(refs, preds))
    xs = [rng.randrange(6) / 2 for _ in range(100)]  # many ties
    ys = [x + rng.gauss(0, 1) for x in xs]
    assert pearson(xs, ys) == pytest.approx(stats.pearsonr(xs, ys)[0])
    assert spearman(xs, ys) == pytest.approx(stats.spearmanr(xs, ys)[0])
    assert spearman(xs, [round(y) for y in ys]) == pytest.approx(stats.spearmanr(xs, [round(y) for y in ys])[0])
