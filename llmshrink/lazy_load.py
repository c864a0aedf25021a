"""Load a checkpoint's weights once, from the file: no dense base model, no second copy.

`meta_weights()` makes every parameter and persistent buffer a "meta" tensor (shape and dtype, no data)
as modules register them; `load_state_dict(..., assign=True)` then puts the file's tensors in their
place. The weights a compressed checkpoint no longer has (the dense layers its compressed layers
replace) are never allocated at all, not even briefly. The tensors safetensors gives map the file:
they are read when first used, as transformers' from_pretrained reads its weights.

Non-persistent buffers (rotary `inv_freq`, BERT's `position_ids`, GPT-2's causal mask) are not in the
file: they are computed for real, as the constructor computes them, which a model built wholly under
`torch.device("meta")` could not do afterwards. `check_materialised` refuses a model that still holds a
meta tensor once loaded. `first_nonfinite` reads the file in small chunks to find NaN or inf, so that
this check does not read every weight into the process.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from llmshrink.errors import LlmshrinkError


class _EmptyOnMeta(TorchFunctionMode):
    """torch.empty without a device (how nn.Linear, nn.Embedding & co. allocate their weights) gives a
    meta tensor. Other factories (arange, ones, tril: what buffers are computed from) stay real."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextmanager
def meta_weights() -> Iterator[None]:
    """Within: parameters and persistent buffers of modules built are meta; non-persistent buffers real."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        # Weights made by torch.zeros/ones (norms, biases: small) were allocated; drop them now.
        if type(param) is nn.Parameter and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer_on_meta(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        if persistent and tensor is not None:  # persistent: in the file
            tensor = tensor.to("meta")
        register_buffer(module, name, tensor, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        with _EmptyOnMeta():
            yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def check_materialised(model: nn.Module, where: Path | str) -> None:
    """Refuse in one line a loaded model that still holds a meta tensor (neither in the file, nor tied,
    nor computed by its constructor)."""
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        first = ", ".join(left[:3]) + (", ..." if len(left) > 3 else "")
        raise LlmshrinkError(f"{where}: {len(left)} tensor(s) left unloaded (still on the meta device): {first}")


# safetensors' names of the floating-point dtypes (the others cannot hold NaN or inf).
_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None)}
_CHUNK = 4 << 20  # bytes read at a time: a multiple of every dtype's size


def first_nonfinite(file: Path, keys: Iterable[str]) -> str | None:
    """The first of `keys` in the safetensors `file` holding NaN or inf, else None.

    Plain reads into one small buffer (not the file's mapping, whose pages would stay in the process):
    memory stays ~_CHUNK whatever the tensors' size. The header was read and checked by safetensors.
    """
    buffer = bytearray(_CHUNK)
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        for key in keys:
            dtype = _FLOATS.get(header[key]["dtype"])
            if dtype is None:
                continue
            begin, end = header[key]["data_offsets"]
            handle.seek(8 + size + begin)
            while begin < end:
                view = memoryview(buffer)[: min(_CHUNK, end - begin)]
                if handle.readinto(view) != len(view):
                    raise LlmshrinkError(f"{file}: {key}: the file ends inside this tensor")
                values = torch.frombuffer(view, dtype=dtype)
                if not bool(torch.isfinite(values if dtype.itemsize > 1 else values.float()).all()):
                    return key
                begin += len(view)
    return None
