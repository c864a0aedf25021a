"""Encoder task evaluation (llmshrink/eval/task_eval.py) on tiny random BERT models, checked by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.task_eval import (
    evaluate_classification,
    evaluate_similarity,
    mean_pool,
    sentence_embeddings,
)
from llmshrink.task_data import Example

WORDS = "the a film was good bad great dull food cold warm service slow fast not very room clean dirty".split()
TEXTS = ["the film was good", "the food was cold", "very slow service", "a clean room",
         "the film was not very good", "dull", "the room was dirty and cold", "fast warm food"]


@pytest.fixture(scope="module")
def tokenizer():
    """A WordPiece BERT tokenizer over a tiny vocabulary: [CLS]/[SEP]/[PAD] and pairs as MiniLM's has."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "and"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert tok("the room was dirty and cold")["input_ids"] == [2, 5 + WORDS.index("the"), 5 + WORDS.index("room"),
                                                              5 + WORDS.index("was"), 5 + WORDS.index("dirty"),
                                                              len(words) - 1, 5 + WORDS.index("cold"), 3]
    return tok


def _config(**overrides):
    from transformers import BertConfig

    return BertConfig(**{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64, **overrides})


def tiny_bert_encoder(seed: int = 0):
    from transformers import BertModel

    torch.manual_seed(seed)
    return BertModel(_config(), add_pooling_layer=False).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2, **overrides):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(_config(num_labels=num_labels, **overrides)).eval()


def _labeled(labels, pairs: bool = False):
    return [Example(TEXTS[i % len(TEXTS)], TEXTS[(i + 3) % len(TEXTS)] if pairs else None, label)
            for i, label in enumerate(labels)]


# --- pooling ---------------------------------------------------------------------------------------------


def test_mean_pool_averages_real_tokens_only():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, -1.0], [-7.0, 7.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [5.0, -1.0]]))  # (1+3)/2, (2+4)/2
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 1], [0, 0, 0]]))[1], torch.zeros(2))  # not NaN


def test_sentence_embeddings_do_not_depend_on_padding_or_batch_size(tokenizer):
    model = tiny_bert_encoder()
    batched = sentence_embeddings(model, tokenizer, TEXTS, batch_size=3)
    assert batched.shape == (len(TEXTS), 64) and batched.dtype == torch.float32
    with torch.no_grad():  # by hand: each text alone (no padding), the plain mean over its tokens
        alone = torch.stack([model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0].mean(0) for t in TEXTS])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(sentence_embeddings(model, tokenizer, TEXTS, batch_size=len(TEXTS)),
                       sentence_embeddings(model, tokenizer, TEXTS, batch_size=len(TEXTS)))


def test_a_classifier_embeds_with_its_encoder_and_is_given_back_training(tokenizer):
    classifier = tiny_bert_classifier().train()  # dropout on: evaluation must switch it off, then back on
    first = sentence_embeddings(classifier, tokenizer, TEXTS)
    assert classifier.training
    assert torch.equal(first, sentence_embeddings(classifier, tokenizer, TEXTS))  # no dropout noise
    with torch.no_grad():
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
        expected = mean_pool(classifier.bert.eval()(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=1e-6)


# --- classification --------------------------------------------------------------------------------------


def _forced(model, bias: list[float]):
    """The classifier answers by its bias alone: every prediction is argmax(bias), known in advance."""
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    return model


def test_forced_binary_predictions_give_the_hand_counted_scores(tokenizer):
    model = _forced(tiny_bert_classifier(), [0.0, 1.0])  # always class 1
    labels = [1, 0, 1, 1, 0, 1, 0, 1]  # 5 ones, 3 zeros
    scores = evaluate_classification(model, tokenizer, _labeled(labels), batch_size=3)
    # TP = 5, FP = 3, FN = 0: accuracy 5/8, F1 = 2·5 / (2·5 + 3 + 0) = 10/13; a constant answer has MCC 0.
    assert scores == {"accuracy": 5 / 8, "f1": 10 / 13, "matthews_corrcoef": 0.0, "examples": 8}


def test_forced_three_class_predictions_use_macro_f1(tokenizer):
    model = _forced(tiny_bert_classifier(num_labels=3), [0.0, -1.0, 2.0])  # always class 2
    labels = [2, 0, 1, 2]
    scores = evaluate_classification(model, tokenizer, _labeled(labels, pairs=True), batch_size=2)
    # Class 2: TP 2, FP 2 -> F1 = 4/6; classes 0 and 1 are never predicted -> F1 0. Macro: (2/3) / 3.
    assert scores == {"accuracy": 0.5, "macro_f1": pytest.approx(2 / 9), "matthews_corrcoef": 0.0, "examples": 4}


def test_real_predictions_match_examples_run_one_by_one(tokenizer):
    # At the default init the input barely reaches [CLS]; a wider init makes the logits depend on it.
    model = tiny_bert_classifier(seed=2, initializer_range=0.2)
    examples = _labeled([0, 1, 1, 0, 1, 0, 0, 1], pairs=True)

    def logits_alone():  # each example by itself: no padding, no batch
        with torch.no_grad():
            return torch.cat([model(**tokenizer(e.text, e.text_pair, return_tensors="pt")).logits for e in examples])

    with torch.no_grad():  # move the class-1 margin's zero between the 4th and 5th example
        gap = (logits_alone() @ torch.tensor([-1.0, 1.0])).sort().values
        model.classifier.bias[1] -= (gap[3] + gap[4]) / 2
    margins = logits_alone() @ torch.tensor([-1.0, 1.0])
    assert margins.abs().min() > 0.1  # far above padding's rounding (~1e-6): batching cannot flip one
    alone = margins.gt(0).long().tolist()
    assert alone.count(1) == 4  # half and half, so accuracy can be anything from 0 to 1
    scores = evaluate_classification(model, tokenizer, examples, batch_size=3)
    correct = sum(p == e.label for p, e in zip(alone, examples, strict=True))
    assert scores["accuracy"] == correct / len(examples) and scores["examples"] == 8


def test_labels_the_model_cannot_predict_are_one_line(tokenizer):
    with pytest.raises(LlmshrinkError) as err:
        evaluate_classification(tiny_bert_classifier(), tokenizer, _labeled([0, 1, 2]))
    assert str(err.value) == "task: example 2 has label 2, but the model predicts 2 classes (0..1)"
    with pytest.raises(LlmshrinkError, match=r"^task: batch_size: expected int >= 1, got 0$"):
        evaluate_classification(tiny_bert_classifier(), tokenizer, _labeled([0]), batch_size=0)


# --- similarity ------------------------------------------------------------------------------------------


def test_similarity_correlates_hand_computed_cosines_with_gold(tokenizer):
    from llmshrink.eval.task_metrics import pearson, spearman

    model = tiny_bert_encoder(seed=1)
    pairs = [(TEXTS[i], TEXTS[(i * 3 + 1) % len(TEXTS)]) for i in range(len(TEXTS))]
    gold = [4.8, 0.2, 3.0, 1.6, 2.4, 0.0, 5.0, 3.8]
    examples = [Example(a, b, g) for (a, b), g in zip(pairs, gold, strict=True)]
    with torch.no_grad():
        embed = lambda t: model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0].mean(0)  # noqa: E731
        cosines = [F.cosine_similarity(embed(a), embed(b), dim=0).item() for a, b in pairs]
    scores = evaluate_similarity(model, tokenizer, examples, batch_size=3)
    assert scores["examples"] == 8
    assert scores["spearman"] == pytest.approx(spearman(cosines, gold), abs=1e-9)
    assert scores["pearson"] == pytest.approx(pearson(cosines, gold), abs=1e-5)


def test_similarity_without_a_correlation_or_a_pair_is_one_line(tokenizer):
    model = tiny_bert_encoder()
    with pytest.raises(LlmshrinkError) as err:
        evaluate_similarity(model, tokenizer, [Example(t, TEXTS[0], 2.0) for t in TEXTS[1:4]])
    assert str(err.value) == "task: spearman: references are constant; correlation is undefined"
    with pytest.raises(LlmshrinkError, match=r"^task: similarity needs two texts per example"):
        evaluate_similarity(model, tokenizer, [Example("a", None, 1.0)])
