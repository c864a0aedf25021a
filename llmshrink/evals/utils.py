"""Helpers that the task YAMLs in this directory call with `!function utils.NAME`.

lm-eval resolves a YAML's `dataset_kwargs: {data_files: ...}` against the current directory, so a
task that names `data/x.jsonl` would only run from this directory. `load_jsonl` reads
its file relative to this directory instead, so the tasks run from anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(llmshrink_data: str, **_metadata: Any) -> datasets.DatasetDict:
    """The JSON-lines file `llmshrink_data` (relative to this directory) as a one-split "test" dataset.

    lm-eval also passes the run's metadata (model args such as `pretrained`) as keywords; unused.
    """
    path = HERE / llmshrink_data
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
