"""drop_layers pass (structured layer pruning): physically remove whole transformer blocks.

The blocks to remove are named (`layers`), or chosen so that `keep` blocks remain:

    select: influence   ShortGPT's block influence, 1 - mean cosine(block input, block output) over calibration
                        tokens from data:; the least influential blocks (those that change the hidden state
                        least) go
    select: first       keep the first `keep` blocks

The kept blocks are renumbered 0..N-1 (each attention's `layer_idx`, its KV-cache slot) and the config's
depth (and its per-block lists, such as Gemma 3's `layer_types`) follows, so the result is a plain, shallower
model of the same architecture: checkpoints reload with plain transformers, no remote code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmshrink.blocks import count_params, find_blocks, per_block_lists
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.drop_layers import DropLayersConfig
from llmshrink.targeting import hooked_eval, token_windows


def apply(model: nn.Module, cfg: DropLayersConfig, ctx: Context) -> PassRecord:
    if cfg.layers is not None and cfg.keep is not None:
        # Only possible past validation: iterate sets `layers` for each group, and indices shift after a drop.
        raise LlmshrinkError("drop_layers: got both layers and keep; run drop_layers outside iterate")
    list_name, family, blocks = find_blocks(model, "drop_layers")
    count = len(blocks)
    check_attention_scaling(model)
    influence, tokens = None, None
    if cfg.layers is not None:
        removed = check_layers(cfg.layers, list_name, count)
    else:
        if cfg.keep >= count:
            raise LlmshrinkError(
                f"drop_layers.keep: {cfg.keep} leaves nothing to remove from the {count} blocks of {list_name}; "
                f"allowed: 1..{count - 1}"
            )
        if cfg.select == "first":
            removed = list(range(cfg.keep, count))
        else:
            ids = ctx.train_token_ids()[: cfg.calibration_tokens]
            tokens = int(ids.numel())
            ctx.log(f"  measuring block influence on {tokens} calibration tokens")
            influence = block_influence(model, blocks, ids)
            ranked = sorted(range(count), key=lambda i: (influence[i], i))  # least influential first
            removed = sorted(ranked[: count - cfg.keep])
    kept = [i for i in range(count) if i not in removed]
    measured = None
    if influence is not None:
        measured = {"scores": [round(s, 6) for s in influence], "calibration_tokens": tokens}  # i: block i
    params_before = count_params(model)
    removed_params = sum(count_params(blocks[i]) for i in removed)
    drop_blocks(model, list_name, blocks, removed)
    ctx.log(f"  {list_name}: removed blocks {removed}, {len(kept)}/{count} remain")
    return {
        "family": family,
        "blocks": list_name,
        "select": "layers" if cfg.layers is not None else cfg.select,
        "blocks_before": count,
        "blocks_after": len(kept),
        "removed": removed,
        "kept": kept,
        "influence": measured,
        "removed_params": removed_params,
        "params_before": params_before,
        "params_after": count_params(model),
    }


# --- structure -------------------------------------------------------------------------------------


def check_attention_scaling(model: nn.Module) -> None:
    """GPT-2 may scale attention by 1/(layer_idx + 1), fixed when the model is built: a moved block would
    compute differently once a checkpoint is rebuilt with its new index."""
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise LlmshrinkError(
            f"drop_layers: {type(model).__name__} scales attention by block index "
            "(config.scale_attn_by_inverse_layer_idx: true), so its blocks cannot move; not supported"
        )


def check_layers(layers: list[int], list_name: str, count: int) -> list[int]:
    seen: set[int] = set()
    for i, index in enumerate(layers):
        if not 0 <= index < count:
            raise LlmshrinkError(
                f"drop_layers.layers[{i}]: block {index} is out of range; {list_name} has blocks 0..{count - 1}"
            )
        if index in seen:
            raise LlmshrinkError(
                f"drop_layers.layers[{i}]: block {index} is listed twice; name each block once"
            )
        seen.add(index)
    if len(seen) == count:
        raise LlmshrinkError(
            f"drop_layers.layers: removes all {count} blocks of {list_name}; keep at least one"
        )
    return sorted(seen)


def drop_blocks(model: nn.Module, list_name: str, blocks: nn.ModuleList, removed: list[int]) -> None:
    """Delete blocks `removed` from the list in place, renumber the rest and shrink the config to match."""
    # Read (and checked) before any block goes: a refusal leaves the model as it was.
    lists = per_block_lists(model, list_name, len(blocks), "drop_layers")
    for index in sorted(removed, reverse=True):
        del blocks[index]  # ModuleList renames the later entries, so the state dict keys run 0..N-1
    for position, block in enumerate(blocks):
        for module in block.modules():  # each attention's KV-cache slot: the cache holds N layers now
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    config = model.config
    gone = set(removed)
    for attribute, entries in lists.items():  # e.g. Gemma 3 picks each block's mask by config.layer_types[i]
        setattr(config, attribute, [entry for i, entry in enumerate(entries) if i not in gone])
    config.num_hidden_layers = len(blocks)  # GPT-2's attribute_map writes n_layer


# --- which blocks to remove ------------------------------------------------------------------------


@torch.no_grad()
def block_influence(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> list[float]:
    """ShortGPT's block influence of each block: 1 - mean over tokens of cos(hidden in, hidden out)."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    sums = torch.zeros(len(blocks), dtype=torch.float64)

    def measure(index: int):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            sums[index] += F.cosine_similarity(hidden.double(), out.double(), dim=-1).sum().item()

        return hook

    handles = [block.register_forward_hook(measure(i), with_kwargs=True) for i, block in enumerate(blocks)]
    counted = 0
    with hooked_eval(model, handles):
        for chunk in token_windows(model, ids):
            model(input_ids=chunk[None], use_cache=False)
            counted += chunk.numel()
    return (1.0 - sums / max(counted, 1)).tolist()
