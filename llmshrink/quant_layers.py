"""What the quantize pass's methods share (int8-dynamic, bnb-*, and mixed, which picks among them per layer):
the targets they may convert, swapping a layer for its quantized form, and the bytes a checkpoint stores."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from llmshrink import bnb
from llmshrink.errors import LlmshrinkError
from llmshrink.targeting import (
    check_tied,
    dense_weight,
    find_targets,
    replace_module,
    shared_weight_names,
    untie,
)

if TYPE_CHECKING:
    from llmshrink.passes.configs.quantize import QuantizeConfig


def swap_layers(model: nn.Module, targets: list[tuple[str, nn.Module]], build: Callable[[nn.Module], nn.Module],
                dequantize: Callable[[nn.Module], torch.Tensor]) -> tuple[list[dict], list[str]]:
    """Replace each target by build(target); (a record per layer, the tied heads that were untied)."""
    layers, untied = [], []
    for name, module in tqdm(targets, desc="quantize", unit="layer", leave=False):
        weight = dense_weight(module)
        if shared_weight_names(model, name):  # untie: the embedding keeps the float tensor, the head its copy
            untie(model, name)
            untied.append(name)
        new = build(module)
        with torch.no_grad():
            error = float((dequantize(new) - weight.float()).norm() / weight.float().norm().clamp(min=1e-30))
        replace_module(model, name, new)
        layers.append({"name": name, "shape": list(weight.shape), "rel_error": round(error, 6),
                       "bytes_before": tensor_bytes(module), "bytes_after": tensor_bytes(new)})
    return layers, untied


def checked_targets(
    model: nn.Module, cfg: QuantizeConfig, skip: tuple[type, ...] = ()
) -> list[tuple[str, nn.Module]]:
    """The float32 Linear/Conv1D layers to quantize, except `skip` ones and bnb layers (quantized already)."""
    found = find_targets(model, cfg.targets, cfg.exclude, cfg.layers, field="quantize.targets")
    targets = [(name, m) for name, m in found if not bnb.is_bnb_layer(m) and not isinstance(m, skip)]
    precision = "4-bit" if cfg.method in bnb.FOUR_BIT else "int8"
    check_tied(model, targets, cfg.tied_embeddings, "quantize", f"run it in {precision}", note=None)
    for name, module in targets:
        if dense_weight(module).dtype != torch.float32:
            raise LlmshrinkError(f"quantize.method: {cfg.method} needs float32 layers; {name} is "
                                 f"{str(dense_weight(module).dtype).removeprefix('torch.')}")
    return targets


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of what a checkpoint stores (parameters and saved buffers), each tensor once (tied weights once)."""
    seen = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in seen.values())
