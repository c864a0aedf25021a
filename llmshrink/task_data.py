"""Labeled task data for encoders: sentence classification and graded sentence-pair similarity.

A `TaskSpec` names where the examples come from (a built-in set shipped in llmshrink/data/tasks/, a datasets
hub id such as `glue` with `config: sst2`, or a local .jsonl/.json/.csv/.parquet file) and which columns hold
the text(s) and the label. `load_examples` reads one split into `Example`s and checks every label: an int
class >= 0 for classification, a finite number for similarity. Torch-free: a recipe that names a task
validates without importing torch (datasets is imported only when a hub or local file is read).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llmshrink.errors import LlmshrinkError, did_you_mean, first_line
from llmshrink.specs import Spec

TaskKind = Literal["classification", "similarity"]

# Local files by suffix -> the datasets builder that reads them; any other source is builtin:NAME or a hub id.
LOCAL_TASK_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class BuiltinTask:
    kind: TaskKind
    files: dict[str, str]  # split -> file under llmshrink/data/tasks/
    label_names: tuple[str, ...] = ()  # classification only


# Provenance and license of each file: llmshrink/data/tasks/README.md.
BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "sentiment": BuiltinTask("classification", {"train": "sentiment_train.jsonl", "test": "sentiment_test.jsonl"},
                             ("negative", "positive")),
    "similarity": BuiltinTask("similarity", {"train": "similarity_train.jsonl", "test": "similarity_test.jsonl"}),
}
# As in llmshrink.corpus: datasets call the held-out split "validation"; here that is the test file.
SPLIT_ALIASES = {"validation": "test"}


class TaskSpec(Spec):
    """Where a task's examples come from and which columns hold text, second text and label.

    Column defaults fit the built-in sets; GLUE names them differently (sst2: `text: sentence`; stsb:
    `text: sentence1, text_pair: sentence2, label: label`).
    """

    kind: TaskKind = Field(description="classification (int class labels) or similarity (graded pair scores)")
    source: str = Field(
        description="builtin:NAME, a datasets hub id, or a local .jsonl/.json/.csv/.parquet file "
        "('{split}' in a file name is replaced by the split read)",
    )
    config: str | None = Field(None, description="datasets config name, e.g. sst2 for glue")
    split: str = Field("test", description="the split evaluated; training reads its own split (e.g. train)")
    text: str = Field("text", description="column of the (first) text")
    text_pair: str | None = Field(
        None, description="column of the second text; none: single texts for classification, "
        "'text_pair' for similarity",
    )
    label: str | None = Field(
        None, description="column of the label (int class) or score (float); none: 'label' for "
        "classification, 'score' for similarity",
    )
    max_examples: int | None = Field(None, ge=1, description="keep only the first N examples of each split")

    @property
    def pair_column(self) -> str | None:
        if self.text_pair is not None:
            return self.text_pair
        return "text_pair" if self.kind == "similarity" else None  # a similarity always compares two texts

    @property
    def label_column(self) -> str:
        if self.label is not None:
            return self.label
        return "label" if self.kind == "classification" else "score"


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int | float | None  # class index (classification), similarity score, or None: unlabeled text


def load_examples(spec: TaskSpec, split: str | None = None) -> list[Example]:
    """The examples of `split` (default: spec.split), in source order, cut to spec.max_examples."""
    split = spec.split if split is None else split
    return _examples(spec, *_rows(spec, split))


def _examples(spec: TaskSpec, rows: list[dict], columns: list[str], where: str) -> list[Example]:
    """The checked examples of one split's rows (as _rows gives them)."""
    wanted = [spec.text, spec.label_column] + ([spec.pair_column] if spec.pair_column else [])
    for name, column in zip(("text", "label", "text_pair"), wanted, strict=False):
        if column not in columns:
            others = [c for c in columns if c not in wanted]  # a column already given a role is no suggestion
            raise LlmshrinkError(f"task.{name}: {where} has no column {column!r}{did_you_mean(column, others)}; "
                                 f"columns: {', '.join(columns) or '(none)'}")
    if not rows:
        raise LlmshrinkError(f"task.source: {where} has no examples")
    examples = []
    for index, row in enumerate(rows):
        text = _text(row, spec.text, "text", where, index)
        pair = _text(row, spec.pair_column, "text_pair", where, index) if spec.pair_column else None
        examples.append(Example(text, pair, _label(spec, row[spec.label_column], where, index)))
    return examples


def label_names(spec: TaskSpec, split: str | None = None) -> tuple[str, ...]:
    """Class names, index = label: a built-in set's names, a hub dataset's ClassLabel names, else '0'..'N-1'
    for the largest label N-1 found in `split` (default: spec.split)."""
    if spec.kind != "classification":
        raise LlmshrinkError(f"task.kind: {spec.kind} has no label names; only classification has classes")
    builtin = _builtin(spec)
    if builtin is not None:
        return builtin.label_names
    split = spec.split if split is None else split
    if _local_path(spec, split) is None:
        dataset = _load_hub(spec, split)  # loaded once: its ClassLabel names, else its examples
        names = _class_names(dataset, spec.label_column)
        if names:
            return names
        examples = _examples(spec, *_dataset_rows(spec, dataset, _hub_where(spec, split)))
    else:
        examples = load_examples(spec, split)
    top = max(int(e.label) for e in examples)
    return tuple(str(i) for i in range(top + 1))


def num_labels(spec: TaskSpec, split: str | None = None) -> int:
    """How many classes a classifier for `spec` needs (len(label_names))."""
    return len(label_names(spec, split))


# --- reading ---------------------------------------------------------------------------------------------


def _rows(spec: TaskSpec, split: str) -> tuple[list[dict], list[str], str]:
    """(rows, column names, how to name the source in a message) of one split, cut to spec.max_examples."""
    builtin = _builtin(spec)
    if builtin is not None:
        key = SPLIT_ALIASES.get(split, split)
        if key not in builtin.files:
            allowed = ", ".join([*builtin.files, *SPLIT_ALIASES])
            raise LlmshrinkError(f"task.split: {spec.source} has no split {split!r}; allowed: {allowed}")
        rows = _read_builtin(builtin.files[key])
        return list(rows[:spec.max_examples]), list(rows[0]), f"{spec.source} ({key})"
    path = _local_path(spec, split)
    if path is None:
        return _dataset_rows(spec, _load_hub(spec, split), _hub_where(spec, split))
    return _dataset_rows(spec, _load_local(path), str(path))


def _dataset_rows(spec: TaskSpec, dataset, where: str) -> tuple[list[dict], list[str], str]:
    """_rows of a loaded datasets split (hub or local file)."""
    limit = spec.max_examples
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))  # before rows become Python dicts: hub splits can be large
    return list(dataset), list(dataset.column_names), where


def _hub_where(spec: TaskSpec, split: str) -> str:
    return f"{spec.source}{f' ({spec.config})' if spec.config else ''} {split}"


def _builtin(spec: TaskSpec) -> BuiltinTask | None:
    if not spec.source.startswith("builtin:"):
        return None
    name = spec.source.removeprefix("builtin:")
    task = BUILTIN_TASKS.get(name)
    if task is None:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_TASKS)
        hint = did_you_mean(name, BUILTIN_TASKS, prefix="builtin:")
        raise LlmshrinkError(f"task.source: unknown built-in task 'builtin:{name}'{hint}; known: {known}")
    if task.kind != spec.kind:
        raise LlmshrinkError(f"task.kind: {spec.source} is a {task.kind} task, not {spec.kind}")
    return task


@lru_cache(maxsize=8)
def _read_builtin(filename: str) -> tuple[dict, ...]:
    text = resources.files("llmshrink").joinpath("data", "tasks", filename).read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def _local_path(spec: TaskSpec, split: str) -> Path | None:
    """The local file spec.source names (with {split} filled in), or None for a hub id or a dataset folder."""
    path = Path(spec.source.replace("{split}", split)).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_TASK_SUFFIXES:
        if not path.is_file():
            raise LlmshrinkError(f"task.source: file not found: {path}")
        return path
    if path.is_file():  # a folder is read like a hub id: datasets finds its split files (train.parquet, ...)
        raise LlmshrinkError(f"task.source: {path}: unsupported file type {suffix or '(none)'!r}; "
                             f"use {', '.join(LOCAL_TASK_SUFFIXES)}")
    return None


def _load_local(path: Path):
    # The same datasets call as for the hub, so local files test that path; a file is one split ("train").
    import datasets

    try:
        return datasets.load_dataset(LOCAL_TASK_SUFFIXES[path.suffix.lower()], data_files={"train": str(path)},
                                     split="train")
    except Exception as err:  # datasets raises many types for malformed files
        raise LlmshrinkError(f"task.source: cannot read {path}: {first_line(err, with_type=False)}") from err


def _load_hub(spec: TaskSpec, split: str):
    import datasets

    try:
        return datasets.load_dataset(spec.source, spec.config, split=split)
    except Exception as err:  # offline, unknown id, config or split: datasets' first line says which
        config = f" (config {spec.config!r})" if spec.config else ""
        raise LlmshrinkError(f"task.source: cannot load dataset {spec.source!r}{config} split {split!r}: "
                             f"{first_line(err)}") from err


def _class_names(dataset, column: str) -> tuple[str, ...]:
    feature = getattr(dataset, "features", {}).get(column)
    return tuple(getattr(feature, "names", None) or ())  # a datasets ClassLabel carries its names


# --- checking values -------------------------------------------------------------------------------------


def _text(row: dict, column: str, field: str, where: str, index: int) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise LlmshrinkError(f"task.{field}: example {index} of {where}: column {column!r} holds "
                             f"{_shown(value)}, not a string")
    return value


def _label(spec: TaskSpec, value: Any, where: str, index: int) -> int | float:
    column = spec.label_column
    if spec.kind == "classification":
        # bool is an int subclass, and 1.0 is a float: both hint at the wrong column or a regression task.
        if not isinstance(value, int) or isinstance(value, bool):
            raise LlmshrinkError(f"task.label: example {index} of {where}: column {column!r} holds "
                                 f"{_shown(value)}; classification needs int class labels 0, 1, ...")
        if value < 0:  # GLUE's test splits hide their labels as -1
            raise LlmshrinkError(f"task.label: example {index} of {where}: label {value} < 0 (a test split with "
                                 "hidden labels? use split: validation)")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LlmshrinkError(f"task.label: example {index} of {where}: column {column!r} holds "
                             f"{_shown(value)}; similarity needs a finite number (score)")
    return float(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
