"""Load a checkpoint written by llmshrink.checkpoint: rebuild the compressed architecture from config.json,
then take the weights from the file strictly (no dense base model, no second copy: see lazy_load).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn

from llmshrink.bnb import rebuild_layers
from llmshrink.checkpoint import (
    ATTRS_KEY,
    BASE_KEY,
    LAYOUT_KEY,
    MANIFEST_FILE,
    apply_layout,
    apply_module_attrs,
)
from llmshrink.checkpoint_files import check_aliases, check_keys, read_json, read_tensor_meta, weight_files
from llmshrink.errors import LlmshrinkError
from llmshrink.lazy_load import check_materialised, first_nonfinite, meta_weights


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the compressed architecture from config.json and load the weights strictly.

    The model is built empty (parameters on "meta", see lazy_load) and takes the file's tensors
    themselves, so neither the dense base nor a second copy of the weights is ever allocated.
    """
    path = Path(path)
    if not path.is_dir():
        raise LlmshrinkError(f"{path}: no such checkpoint directory")
    for name in ("config.json", MANIFEST_FILE):
        if not (path / name).is_file():
            raise LlmshrinkError(f"{path}: not an llmshrink checkpoint (no {name})")
    raw = read_json(path / "config.json")
    layout = raw.get(LAYOUT_KEY) or {}
    attrs = raw.get(ATTRS_KEY) or {}
    base = raw.get(BASE_KEY) or (raw.get("architectures") or [None])[0]
    base_cls = getattr(transformers, str(base), None)
    if not (isinstance(base_cls, type) and issubclass(base_cls, transformers.PreTrainedModel)):
        raise LlmshrinkError(f"{path / 'config.json'}: {BASE_KEY}: {base!r} is not a transformers model class")
    config = transformers.AutoConfig.from_pretrained(path)
    # A plain base config: no routing to remote code, no quantization (the bnb layers are rebuilt below).
    for key in ("auto_map", LAYOUT_KEY, ATTRS_KEY, BASE_KEY, "quantization_config"):
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [base_cls.__name__]
    model = _build(base_cls, config)
    apply_layout(model, layout)
    apply_module_attrs(model, attrs)
    rebuild_layers(model, raw.get("quantization_config"), weight_files(path), path / "config.json",
                   torch.device(device))
    _load_weights(model, path)
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _build(base_cls: type, config: Any) -> nn.Module:
    """Construct the base model empty (see lazy_load) in the saved dtype, skipping random init."""
    dtype = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    dtype = dtype or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            no_init_weights = nullcontext
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), meta_weights():
            return base_cls(config)
    finally:
        torch.set_default_dtype(previous)


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load block by block; each (checked) file tensor becomes the parameter itself (assign): no copy.

    Those tensors map the file and are read from it when first used (see lazy_load). Tensors already real
    (bnb layers, rebuilt from the file) are copied into, as their classes need.
    """
    state = model.state_dict()
    expected = {key: (tuple(t.shape), t.dtype) for key, t in state.items()}
    empty = {key for key, t in state.items() if t.is_meta}
    del state
    check_keys(model, read_tensor_meta(path).keys(), path)
    loaded: set[str] = set()
    for file in weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as lazy:
            bad = first_nonfinite(file, lazy.keys())
            if bad is not None:
                raise LlmshrinkError(f"{file}: {bad}: contains NaN or inf")
            for keys in _block_groups(lazy.keys()):
                chunk = {key: _checked_tensor(lazy, key, expected[key], file) for key in keys}
                assign = {key: t for key, t in chunk.items() if key in empty}
                if assign:
                    model.load_state_dict(assign, strict=False, assign=True)
                if len(assign) < len(chunk):
                    model.load_state_dict({k: t for k, t in chunk.items() if k not in empty}, strict=False)
                loaded.update(chunk)
    model.tie_weights()  # the assigned tensors replaced the (meta) ones the tied modules shared
    check_aliases(model, loaded, path)
    check_materialised(model, path)


def _block_groups(keys: Iterable[str]) -> list[list[str]]:
    """Keys grouped by their numbered block ("model.layers.3."), the rest together: a module's keys
    always share a group, as its load hooks need them together."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        block = re.match(r"(.*?\.\d+\.)", key)
        groups.setdefault(block.group(1) if block else "", []).append(key)
    return list(groups.values())


def _checked_tensor(handle: Any, key: str, want: tuple[tuple[int, ...], torch.dtype], file: Path) -> torch.Tensor:
    tensor = handle.get_tensor(key)
    if (tuple(tensor.shape), tensor.dtype) != want:
        raise LlmshrinkError(
            f"{file}: {key}: saved {tuple(tensor.shape)} {tensor.dtype}, the rebuilt model expects {want[0]} {want[1]}"
        )
    return tensor
