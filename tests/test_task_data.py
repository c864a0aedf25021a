"""Encoder task data (llmshrink/task_data.py): the shipped sets, TaskSpec, local files and hub-style folders."""

from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest
from pydantic import ValidationError

from llmshrink.errors import LlmshrinkError
from llmshrink.stages import describe_error
from llmshrink.task_data import Example, TaskSpec, label_names, load_examples, num_labels

SENTIMENT = TaskSpec(kind="classification", source="builtin:sentiment")
SIMILARITY = TaskSpec(kind="similarity", source="builtin:similarity")


def _error(call, *args) -> str:
    with pytest.raises(LlmshrinkError) as err:
        call(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# --- the shipped sets ------------------------------------------------------------------------------------


def test_builtin_sentiment_is_balanced_and_its_splits_are_disjoint():
    train, test = load_examples(SENTIMENT, "train"), load_examples(SENTIMENT)  # spec.split defaults to test
    assert (len(train), len(test)) == (450, 150)
    assert Counter(e.label for e in train) == {0: 225, 1: 225}
    assert Counter(e.label for e in test) == {0: 75, 1: 75}
    assert all(type(e.label) is int and e.text_pair is None for e in train + test)
    texts = [e.text for e in train + test]
    assert len(set(texts)) == 600  # no sentence twice, so none in both splits
    assert 8 < statistics.mean(len(t.split()) for t in texts) < 14
    assert len({w.strip(".,;:!?").lower() for t in texts for w in t.split()}) > 1500  # varied vocabulary
    assert load_examples(SENTIMENT, "validation") == test
    assert label_names(SENTIMENT) == ("negative", "positive") and num_labels(SENTIMENT) == 2
    assert Example("The queue was long, but the food justified every minute.", None, 1) in train + test


def test_builtin_similarity_scores_spread_over_the_whole_scale():
    train, test = load_examples(SIMILARITY, "train"), load_examples(SIMILARITY, "test")
    assert (len(train), len(test)) == (250, 89)
    for split in (train, test):
        scores = [e.label for e in split]
        assert all(type(s) is float and 0.0 <= s <= 5.0 for s in scores)
        bins = Counter(min(int(s), 4) for s in scores)  # [0,1) [1,2) [2,3) [3,4) [4,5]
        assert sorted(bins) == [0, 1, 2, 3, 4] and min(bins.values()) >= 0.1 * len(split)
        assert 1.5 < statistics.pstdev(scores) < 2.0 and 2.0 < statistics.mean(scores) < 2.8
    assert Counter(min(int(e.label), 4) for e in test) == {0: 22, 1: 13, 2: 16, 3: 19, 4: 19}
    sentences = lambda split: {t for e in split for t in (e.text, e.text_pair)}  # noqa: E731
    assert not sentences(train) & sentences(test)  # split by anchor group: no sentence leaks
    swapped = {"The dog bit the postman on the leg.", "The postman bit the dog on the leg."}
    assert [e.label for e in train + test if {e.text, e.text_pair} == swapped] == [2.0]  # a hard case


def test_max_examples_keeps_the_first_examples_in_source_order():
    spec = SENTIMENT.model_copy(update={"max_examples": 5})
    assert load_examples(spec, "train") == load_examples(SENTIMENT, "train")[:5]


# --- TaskSpec --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ({"kind": "regression", "source": "x"},
     "task.kind: input should be 'classification' or 'similarity', got 'regression'"),
    ({"source": "builtin:sentiment"}, "task.kind: required field is missing"),
    ({"kind": "classification", "source": "builtin:sentiment", "max_examples": 0},
     "task.max_examples: input should be greater than or equal to 1, got 0"),
    ({"kind": "classification", "source": "builtin:sentiment", "max_examples": "5"},
     "task.max_examples: input should be a valid integer, got '5'"),
    ({"kind": "classification", "source": "builtin:sentiment", "text_field": "sentence"},
     "task.text_field: unknown key; allowed: kind, source, config, split, text, text_pair, label, max_examples"),
])
def test_task_spec_rejects_bad_settings_in_one_line(raw, expected):
    with pytest.raises(ValidationError) as err:
        TaskSpec(**raw)
    assert ": ".join(describe_error(err.value, TaskSpec, "task")) == expected


def test_column_defaults_follow_the_kind():
    assert (SENTIMENT.pair_column, SENTIMENT.label_column) == (None, "label")
    assert (SIMILARITY.pair_column, SIMILARITY.label_column) == ("text_pair", "score")
    glue = TaskSpec(kind="similarity", source="glue", config="stsb", text="sentence1", text_pair="sentence2",
                    label="label")
    assert (glue.pair_column, glue.label_column) == ("sentence2", "label")


@pytest.mark.parametrize(("spec", "split", "expected"), [
    (TaskSpec(kind="classification", source="builtin:sentimnt"), "test",
     "task.source: unknown built-in task 'builtin:sentimnt' (did you mean builtin:sentiment?); "
     "known: builtin:sentiment, builtin:similarity"),
    (TaskSpec(kind="classification", source="builtin:similarity"), "test",
     "task.kind: builtin:similarity is a similarity task, not classification"),
    (SENTIMENT, "dev", "task.split: builtin:sentiment has no split 'dev'; allowed: train, test, validation"),
    (TaskSpec(kind="similarity", source="builtin:similarity", label="label"), "test",
     "task.label: builtin:similarity (test) has no column 'label'; columns: text, text_pair, score"),
])
def test_builtin_misuse_is_one_line(spec, split, expected):
    assert _error(load_examples, spec, split) == expected


def test_similarity_has_no_label_names():
    assert _error(label_names, SIMILARITY) == (
        "task.kind: similarity has no label names; only classification has classes")


# --- local files -----------------------------------------------------------------------------------------


def test_csv_and_jsonl_files_load_with_their_own_column_names(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text('sentence1,sentence2,gold\n"A cat, asleep.",A dog.,1.5\nRain.,Snow.,3\n', encoding="utf-8")
    spec = TaskSpec(kind="similarity", source=str(csv), text="sentence1", text_pair="sentence2", label="gold")
    assert load_examples(spec) == [Example("A cat, asleep.", "A dog.", 1.5), Example("Rain.", "Snow.", 3.0)]
    rows = [{"sentence": "good", "y": 2}, {"sentence": "bad", "y": 0}, {"sentence": "meh", "y": 1}]
    jsonl = _jsonl(tmp_path / "topics.jsonl", rows)
    spec = TaskSpec(kind="classification", source=jsonl, text="sentence", label="y")
    assert load_examples(spec) == [Example("good", None, 2), Example("bad", None, 0), Example("meh", None, 1)]
    assert label_names(spec) == ("0", "1", "2") and num_labels(spec) == 3  # no names in a plain file


def test_split_placeholder_picks_one_file_per_split(tmp_path):
    _jsonl(tmp_path / "sst_train.jsonl", [{"text": "fine", "label": 1}, {"text": "dull", "label": 0}])
    _jsonl(tmp_path / "sst_test.jsonl", [{"text": "great", "label": 1}])
    spec = TaskSpec(kind="classification", source=str(tmp_path / "sst_{split}.jsonl"))
    assert [e.text for e in load_examples(spec)] == ["great"]
    assert [e.text for e in load_examples(spec, "train")] == ["fine", "dull"]
    assert _error(load_examples, spec, "validation") == (
        f"task.source: file not found: {tmp_path / 'sst_validation.jsonl'}")


@pytest.mark.parametrize(("rows", "column", "expected"), [
    ([{"text": "a", "label": 1.0}], "label",
     "task.label: example 0 of {path}: column 'label' holds float 1.0; classification needs int class labels 0, 1, ..."),
    ([{"text": "a", "label": 1}, {"text": "b", "label": "positive"}], "label",
     "task.label: example 1 of {path}: column 'label' holds str 'positive'; classification needs int class labels "
     "0, 1, ..."),
    ([{"text": "a", "label": True}], "label",
     "task.label: example 0 of {path}: column 'label' holds bool True; classification needs int class labels 0, 1, ..."),
    ([{"text": "a", "label": -1}], "label",
     "task.label: example 0 of {path}: label -1 < 0 (a test split with hidden labels? use split: validation)"),
    ([{"text": None, "label": 0}, {"text": "b", "label": 1}], "label",
     "task.text: example 0 of {path}: column 'text' holds NoneType None, not a string"),
    ([{"txt": "a", "labels": 0}], "label",
     "task.text: {path} has no column 'text' (did you mean txt?); columns: txt, labels"),
    ([{"text": "a", "labels": 0}], "label",
     "task.label: {path} has no column 'label' (did you mean labels?); columns: text, labels"),
])
def test_bad_classification_rows_are_one_line(tmp_path, rows, column, expected):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    spec = TaskSpec(kind="classification", source=path, label=column)
    assert _error(load_examples, spec) == expected.format(path=path)


def test_bad_similarity_rows_are_one_line(tmp_path):
    path = _jsonl(tmp_path / "sts.jsonl", [{"text": "a", "text_pair": "b", "score": "high"}])
    assert _error(load_examples, TaskSpec(kind="similarity", source=path)) == (
        f"task.label: example 0 of {path}: column 'score' holds str 'high'; similarity needs a finite number (score)")
    path = _jsonl(tmp_path / "single.jsonl", [{"text": "a", "score": 1.0}])
    assert _error(load_examples, TaskSpec(kind="similarity", source=path)) == (
        f"task.text_pair: {path} has no column 'text_pair'; columns: text, score")


def test_missing_unsupported_and_unreadable_files_are_one_line(tmp_path):
    missing = tmp_path / "nope.csv"
    assert _error(load_examples, TaskSpec(kind="classification", source=str(missing))) == (
        f"task.source: file not found: {missing}")
    text = tmp_path / "reviews.txt"
    text.write_text("good\n")
    assert _error(load_examples, TaskSpec(kind="classification", source=str(text))) == (
        f"task.source: {text}: unsupported file type '.txt'; use .jsonl, .json, .csv, .parquet")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 0}\n{"text": \n')
    assert _error(load_examples, TaskSpec(kind="classification", source=str(broken))).startswith(
        f"task.source: cannot read {broken}: ")


# --- the hub path (datasets.load_dataset(source, config, split)) on a local dataset folder ------------------


def test_a_dataset_folder_loads_through_the_hub_path_with_class_names(tmp_path):
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    folder = tmp_path / "sst2"
    folder.mkdir()
    datasets.Dataset.from_dict({"sentence": ["ok", "bad", "good"], "label": [1, 0, 1]},
                               features=features).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_dict({"sentence": ["nice"], "label": [1]}, features=features).to_parquet(
        str(folder / "validation.parquet"))
    spec = TaskSpec(kind="classification", source=str(folder), split="validation", text="sentence")
    assert load_examples(spec) == [Example("nice", None, 1)]
    assert [e.label for e in load_examples(spec, "train")] == [1, 0, 1]
    assert label_names(spec) == ("negative", "positive")  # from the ClassLabel feature, as GLUE has
    message = _error(load_examples, spec, "test")
    assert message.startswith(f"task.source: cannot load dataset {str(folder)!r} split 'test': ")


def test_hub_labels_without_class_names_load_the_split_once(tmp_path, monkeypatch):
    import datasets

    folder = tmp_path / "plain"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 2, 1]}).to_parquet(str(folder / "test.parquet"))
    loads = []
    load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loads.append(a) or load(*a, **k))
    spec = TaskSpec(kind="classification", source=str(folder))
    assert label_names(spec) == ("0", "1", "2") and len(loads) == 1  # no ClassLabel: the same load's labels
    assert label_names(spec.model_copy(update={"max_examples": 2})) == ("0", "1", "2") and len(loads) == 2
    assert _error(label_names, spec.model_copy(update={"label": "score"})).startswith(
        "task.label: " + str(folder) + " test has no column 'score'")


def test_an_unreachable_hub_dataset_is_one_line():
    spec = TaskSpec(kind="classification", source="llmshrink-no-such-org/no-such-dataset", config="sst2",
                    text="sentence")
    assert _error(load_examples, spec).startswith(
        "task.source: cannot load dataset 'llmshrink-no-such-org/no-such-dataset' (config 'sst2') split 'test': ")


def test_max_examples_cuts_a_local_file_too(tmp_path):
    path = _jsonl(tmp_path / "five.jsonl", [{"text": str(i), "label": i % 2} for i in range(5)])
    spec = TaskSpec(kind="classification", source=path, max_examples=2)
    assert load_examples(spec) == [Example("0", None, 0), Example("1", None, 1)]
    assert len(load_examples(spec.model_copy(update={"max_examples": 9}))) == 5
