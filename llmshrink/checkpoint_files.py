"""What a checkpoint directory holds, read without loading it: its JSON files, its weight files and their
tensor headers; and the checks that those tensors match a model's state dict (at save and at load time).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from llmshrink.errors import LlmshrinkError

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a missing, unreadable or non-object file is a one-line LlmshrinkError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LlmshrinkError(f"{path}: cannot read JSON: {err}") from None
    if not isinstance(data, dict):
        raise LlmshrinkError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's .safetensors files: the single one, or the shards its index names."""
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if (path / WEIGHTS_INDEX).is_file():
        shards = sorted(set(read_json(path / WEIGHTS_INDEX).get("weight_map", {}).values()))
        return [path / shard for shard in shards]
    raise LlmshrinkError(f"{path}: no {WEIGHTS_FILE} (or {WEIGHTS_INDEX})")


def read_tensor_meta(path: Path) -> dict[str, tuple[list[int], str]]:
    """{tensor name: (shape, dtype name)} from the safetensors headers, without reading the data."""
    meta: dict[str, tuple[list[int], str]] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    meta[key] = (handle.get_slice(key).get_shape(), handle.get_slice(key).get_dtype())
        except Exception as err:  # safetensors raises its own error types for bad files
            raise LlmshrinkError(f"{file}: cannot read safetensors: {err}") from None
    return meta


def check_keys(model: nn.Module, file_keys: Iterable[str], where: Path) -> None:
    """Every tensor in the file must be one the model has."""
    unexpected = sorted(set(file_keys) - set(model.state_dict()))
    if unexpected:
        raise LlmshrinkError(
            f"{where}: {len(unexpected)} tensor(s) the rebuilt model does not have: {first_few(unexpected)}"
        )


def check_aliases(model: nn.Module, loaded: set[str], where: Path) -> None:
    """Every tensor not in the file must be the very same tensor as one that is (tied weights)."""
    state = model.state_dict(keep_vars=True)
    loaded_ids = {id(state[key]) for key in loaded if key in state}
    missing = sorted(key for key in state if key not in loaded and id(state[key]) not in loaded_ids)
    if missing:
        raise LlmshrinkError(f"{where}: {len(missing)} tensor(s) missing from the weights: {first_few(missing)}")


def first_few(keys: list[str], count: int = 3) -> str:
    """The first `count` keys, comma-separated, and ", ..." when there are more."""
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")
