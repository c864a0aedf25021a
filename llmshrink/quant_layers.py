"""What the quantize pass's methods share (int8-dynamic, bnb-*, and mixed, which picks among them per layer):
the targets they may convert, swapping a layer for its quantized form, and the bytes a checkpoint stores; and
int8-dynamic's embedding tables (embeddings: true): finding, checking and swapping them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from llmshrink import bnb
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.int8_embedding import Int8Embedding
from llmshrink.targeting import (
    check_tied,
    dense_weight,
    find_embeddings,
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


def checked_embeddings(model: nn.Module, cfg: QuantizeConfig) -> list[tuple[str, nn.Embedding]]:
    """The float32 nn.Embedding tables int8-dynamic stores in int8 (embeddings: true); checks only, nothing
    changes. A tied one (an lm_head or MLM decoder shares its weight) is refused unless tied_embeddings: untie."""
    field = "quantize.embedding_targets"
    targets = find_embeddings(model, cfg.embedding_targets, cfg.exclude, field)
    for name, module in targets:
        if module.weight.dtype != torch.float32:
            raise LlmshrinkError(f"quantize.method: {cfg.method} needs float32 embeddings; {name} is "
                                 f"{str(module.weight.dtype).removeprefix('torch.')}")
        check_tied(model, [(name, module)], cfg.tied_embeddings, "quantize", "store it in int8",
                   note="{others} keeps a float copy", field="embedding_targets")
    return targets


def swap_embeddings(model: nn.Module, targets: list[tuple[str, nn.Embedding]]) -> tuple[list[dict], list[str]]:
    """Replace each embedding by an Int8Embedding; (a record per table, the tied ones that were untied).

    An untied table's bytes_after include its float copy, which the head it was tied to now stores alone
    (`float_copy_bytes`): the checkpoint holds both, so untying grows it (the head stays exact)."""
    tables, untied = [], []
    for name, module in targets:
        copy_bytes = 0
        if shared_weight_names(model, name):  # the embedding gets its own copy; the head keeps the tensor
            copy_bytes = tensor_bytes(module)
            untie(model, name)
            untied.append(name)
        weight = module.weight.detach()
        new = Int8Embedding.from_embedding(module)
        with torch.no_grad():
            diff = new.to_dense() - weight.float()
            error = float(diff.norm() / weight.float().norm().clamp(min=1e-30))
            max_abs = float(diff.abs().max()) if diff.numel() else 0.0
        replace_module(model, name, new)
        tables.append({"name": name, "shape": list(weight.shape), "rel_error": round(error, 6),
                       "max_abs_error": max_abs, "bytes_before": tensor_bytes(module),
                       "bytes_after": tensor_bytes(new) + copy_bytes}
                      | ({"float_copy_bytes": copy_bytes} if copy_bytes else {}))
    return tables, untied
