"""Size of a model: unique parameters, state-dict bytes, tied embeddings, and bytes on disk (a checkpoint
directory, or the model's state dict as one .safetensors file, computed without writing it).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _storage_key(t: torch.Tensor) -> tuple:
    """Tensors with equal keys hold the same numbers (tied / shared weights), so count them once."""
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.data_ptr(), tuple(t.shape), t.dtype)


def _unique_params(model: nn.Module) -> dict[tuple, torch.Tensor]:
    unique: dict[tuple, torch.Tensor] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        unique.setdefault(_storage_key(p), p)
    return unique


def _weights(p: torch.Tensor) -> int:
    """Weights a parameter holds: a bitsandbytes 4-bit one packs two per byte and keeps its shape aside."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def count_params(model: nn.Module) -> int:
    """Number of unique parameters: tied or shared weights count once. Weights that llmshrink's int8 and
    clustered layers keep in integer buffers count as the parameters they stand for (as bitsandbytes'
    packed 4-bit parameters do); other buffers do not count."""
    params = sum(_weights(p) for p in _unique_params(model).values())
    return params + sum(m.buffered_weights() for m in model.modules() if hasattr(m, "buffered_weights"))


def count_bytes(model: nn.Module) -> int:
    """Bytes of the tensor data a checkpoint stores: the state dict (parameters, persistent buffers, and what
    bitsandbytes layers add, e.g. 4-bit absmax and quant maps), each shared tensor once."""
    unique: dict[tuple, torch.Tensor] = {}
    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor):
            unique.setdefault(_storage_key(t), t)
    return sum(t.numel() * t.element_size() for t in unique.values())


def has_tied_embeddings(model: nn.Module) -> bool:
    """True when the output projection shares its weight with the input embedding."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    emb, head = get_in(), get_out()
    if emb is None or head is None:
        return False
    # The weight parameters themselves: a quantized layer has none (Int8DynamicLinear) or builds a float copy on
    # each read (Int8Embedding's weight property), and shares nothing.
    weights = emb._parameters.get("weight"), head._parameters.get("weight")
    return None not in weights and _storage_key(weights[0]) == _storage_key(weights[1])


def dir_size(path: str | os.PathLike, weights_only: bool = False) -> int:
    """Bytes of the files under a checkpoint directory (only *.safetensors / *.bin if weights_only).

    Follows symlinks, so a hub cache snapshot (links into blobs/) reports the real size.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if weights_only and not name.endswith(WEIGHT_SUFFIXES):
                continue
            total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def safetensors_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict written as one .safetensors file (tied weights once), computed
    exactly without writing anything: 8 bytes of header length, the JSON header (padded to 8 bytes as
    safetensors pads it), then the tensor data.

    The header's key order, dtype names and padding come from safetensors itself, by serialising
    one-element stand-ins in memory; only their shapes and byte offsets are replaced.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            tensors[name] = t
    if not tensors:
        return len(save_bytes({}, metadata={"format": "pt"}))
    probe_bytes = save_bytes({name: torch.zeros(1, dtype=t.dtype) for name, t in tensors.items()},
                             metadata={"format": "pt"})
    length = int.from_bytes(probe_bytes[:8], "little")
    probe_text = probe_bytes[8:8 + length].decode("utf-8")
    header = json.loads(probe_text)
    if _compact_json(header) != probe_text.rstrip(" "):  # a safetensors that writes headers another way
        return len(save_bytes({k: t.detach().cpu().contiguous() for k, t in tensors.items()},
                              metadata={"format": "pt"}))
    data_order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    offset = 0
    for name in data_order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {**header[name], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text_bytes = len(_compact_json(header).encode("utf-8"))
    if _pads_header():
        text_bytes += -text_bytes % 8
    return 8 + text_bytes + offset


def _compact_json(value) -> str:
    # serde_json's compact form, as safetensors (Rust) writes its header
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@functools.cache
def _pads_header() -> bool:
    """Whether this safetensors pads the header to 8 bytes (newer versions do), seen on a 54-byte header."""
    probe = save_bytes({"ab": torch.zeros(1, dtype=torch.uint8)})
    return int.from_bytes(probe[:8], "little") % 8 == 0
