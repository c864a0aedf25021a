"""share_layers pass (MobileLLM layer sharing): several positions of the block stack run one block.

The depth (config.num_hidden_layers, the number of positions) stays; the unique blocks, and so the
parameters, shrink. `share_map[i]` names the block position i runs:

    mode: repeat   MobileLLM's immediate block-wise repeat: [0, 0, 2, 2, 4, 4, ...] (every other block kept,
                   each run twice; an odd last block runs once)
    mode: map      an explicit share_map, one original block index per position
    mode: select   merge the most similar adjacent blocks until `unique_blocks` remain; similarity is the
                   cosine of their flattened weights (select: weights), or of what they add to the residual
                   stream when both run on the second one's input from calibration text (select: outputs)

The positions that run one block form a group; its first position holds the block, the others a
SharedBlockRef to it (llmshrink/modules/shared_block.py), so each shared tensor exists, trains and is
saved once. The block is the named original (init: first) or the mean of the original blocks at the
group's positions (init: average). A group's positions, and the block it runs, must agree on the config's
per-block entries (the family's per_block_config: Gemma 3's sliding or full `layer_types`).
"""

from __future__ import annotations

import torch
from torch import nn

from llmshrink.blocks import count_params, find_blocks, per_block_lists
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.shared_block import SharedBlockRef
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.share_layers import ShareLayersConfig
from llmshrink.targeting import hooked_eval, token_windows


def apply(model: nn.Module, cfg: ShareLayersConfig, ctx: Context) -> PassRecord:
    list_name, family, blocks = find_blocks(model)
    count = len(blocks)
    params_before = count_params(model)
    block_params_before = sum(count_params(block) for block in blocks)
    mode = cfg.resolved_mode
    similarity, tokens = None, None
    if mode == "repeat":
        share_map = [i - i % 2 for i in range(count)]
    elif mode == "map":
        share_map = check_share_map(cfg.share_map, list_name, count)
    else:
        if cfg.unique_blocks > count:
            raise LlmshrinkError(
                f"share_layers.unique_blocks: {cfg.unique_blocks} exceeds the {count} blocks of {list_name}"
            )
        if cfg.select == "weights":
            similarity = weight_similarity(blocks, list_name)
        else:
            ids = ctx.train_token_ids()[: cfg.calibration_tokens]
            tokens = int(ids.numel())
            ctx.log(f"  comparing adjacent blocks' outputs on {tokens} calibration tokens")
            similarity = output_similarity(model, blocks, ids)
        share_map = merge_most_similar(similarity, cfg.unique_blocks)
    groups = groups_of(share_map)
    check_layer_types(model, list_name, count, groups, cfg.init)
    share_blocks(model, list_name, blocks, share_map, cfg.init)
    for source, positions in groups.items():
        if len(positions) > 1:
            ctx.log(f"  {list_name}: positions {positions} share block {source} ({cfg.init})")
    block_params_after = sum(count_params(blocks[positions[0]]) for positions in groups.values())
    return {
        "mode": mode,
        "family": family,
        "blocks": list_name,
        "positions": count,
        "share_map": share_map,
        "unique_blocks": len(groups),
        "groups": list(groups.values()),
        "init": cfg.init,
        "similarity": None if similarity is None else {
            "method": cfg.select,
            "adjacent": [round(s, 6) for s in similarity],  # entry i: blocks i and i+1
            "calibration_tokens": tokens,
        },
        "block_params_before": block_params_before,
        "block_params_after": block_params_after,
        "params_before": params_before,
        "params_after": count_params(model),
    }


# --- structure -------------------------------------------------------------------------------------


def check_share_map(share_map: list[int], list_name: str, count: int) -> list[int]:
    if len(share_map) != count:
        raise LlmshrinkError(
            f"share_layers.share_map: {len(share_map)} entries for the {count} positions of {list_name}; "
            "give one block index per position"
        )
    for i, source in enumerate(share_map):
        if not 0 <= source < count:
            raise LlmshrinkError(
                f"share_layers.share_map[{i}]: block {source} is out of range; "
                f"{list_name} has blocks 0..{count - 1}"
            )
    return list(share_map)


def groups_of(share_map: list[int]) -> dict[int, list[int]]:
    """{original block: the positions that run it}, in order of first position."""
    groups: dict[int, list[int]] = {}
    for position, source in enumerate(share_map):
        groups.setdefault(source, []).append(position)
    return groups


def check_layer_types(
    model: nn.Module, list_name: str, count: int, groups: dict[int, list[int]], init: str
) -> None:
    """Refuse sharing where per-block config entries differ (e.g. sliding and full attention): a block's attention
    is built for its own entry, while the model hands each position the mask (and RoPE) of that position's."""
    for attribute, entries in per_block_lists(model, list_name, count, "share_layers").items():
        what = "layer types" if attribute == "layer_types" else f"config.{attribute} entries"
        for source, positions in groups.items():
            kinds = {str(entries[p]) for p in positions}
            if len(kinds) > 1:
                raise LlmshrinkError(
                    f"share_layers: positions {positions} have different {what} "
                    f"({', '.join(sorted(kinds))}) and cannot share one block"
                )
            averaged = init == "average" and len(positions) > 1  # built on the owner's block, not the source's
            if not averaged and str(entries[source]) not in kinds:
                raise LlmshrinkError(
                    f"share_layers: block {source} ({entries[source]}) cannot run at positions {positions} "
                    f"({kinds.pop()}): different {what}"
                )


@torch.no_grad()
def share_blocks(
    model: nn.Module, list_name: str, blocks: nn.ModuleList, share_map: list[int], init: str
) -> None:
    """Put each group's block at its first position and a SharedBlockRef to it at the others."""
    originals = list(blocks)
    groups = groups_of(share_map)
    if init == "average":  # check every group before changing any
        for positions in groups.values():
            members = [originals[p] for p in positions]
            check_same_shapes(members, [f"{list_name}.{p}" for p in positions], "share_layers.init: average")
    for source, positions in groups.items():
        owner = positions[0]
        block = originals[source]
        if init == "average" and len(positions) > 1:
            # Written into the owner's own original: groups' positions are disjoint, so no group reads
            # a block another group has already overwritten.
            block = originals[owner]
            members = [originals[p] for p in positions]
            for name, param in block.named_parameters():
                mean = torch.stack([m.get_parameter(name).float() for m in members]).mean(0)
                param.copy_(mean.to(param.dtype))
        for module in block.modules():  # the KV-cache slot of the position that holds it
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = owner
        blocks[owner] = block
    for position, source in enumerate(share_map):
        owner = groups[source][0]
        if position != owner:
            ref = SharedBlockRef(f"{list_name}.{owner}", position)
            blocks[position] = ref
            ref.bind(model)


def check_same_shapes(members: list[nn.Module], names: list[str], field: str) -> None:
    first = {name: tuple(p.shape) for name, p in members[0].named_parameters()}
    for module, name in zip(members[1:], names[1:], strict=True):
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
        if shapes != first:
            differ = sorted(set(first) ^ set(shapes)) or [n for n in first if first[n] != shapes[n]]
            raise LlmshrinkError(
                f"{field}: {names[0]} and {name} differ at {differ[0]}; blocks must have the same parameter "
                "shapes (use init: first, or share before passes that reshape blocks)"
            )


# --- which blocks to merge -------------------------------------------------------------------------


@torch.no_grad()
def weight_similarity(blocks: nn.ModuleList, list_name: str) -> list[float]:
    """Cosine of the flattened parameters of blocks i and i+1, for each i."""
    names = [f"{list_name}.{i}" for i in range(len(blocks))]
    scores = []
    for i in range(len(blocks) - 1):
        check_same_shapes([blocks[i], blocks[i + 1]], names[i : i + 2], "share_layers.select: weights")
        a, b = (_flat(blocks[j]) for j in (i, i + 1))
        scores.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    return scores


@torch.no_grad()
def output_similarity(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> list[float]:
    """For each i: mean over tokens of the cosine between what blocks i and i+1 add to the residual stream,
    both run on block i+1's input (can block i stand in for block i+1 where it would run a second time?)."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    calls: dict[int, tuple] = {}

    def record(index: int):
        def hook(module, args, kwargs, output):
            calls[index] = (args, kwargs, output)

        return hook

    handles = [block.register_forward_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    sums, counted = torch.zeros(len(blocks) - 1, dtype=torch.float64), 0
    with hooked_eval(model, handles):
        for chunk in token_windows(model, ids):
            calls.clear()
            # No cache: a block run again below must not append to the cache slot of its first run.
            model(input_ids=chunk[None], use_cache=False)
            replay = dict(calls)  # the replays below run hooked blocks too
            for i in range(len(blocks) - 1):
                args, kwargs, output = replay[i + 1]
                hidden = args[0] if args else kwargs["hidden_states"]
                other = blocks[i](*args, **kwargs)
                own, alt = (_first(x).double() - hidden.double() for x in (output, other))
                sums[i] += torch.nn.functional.cosine_similarity(own, alt, dim=-1).sum().item()
            counted += chunk.numel()
    return (sums / max(counted, 1)).tolist()


def _flat(block: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in block.parameters()])


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def merge_most_similar(similarity: list[float], unique_blocks: int) -> list[int]:
    """Merge the most similar adjacent pairs until `unique_blocks` runs remain; each position runs the
    first block of its run. Equivalently: cut at the unique_blocks - 1 least similar boundaries."""
    count = len(similarity) + 1
    ranked = sorted(range(count - 1), key=lambda i: (similarity[i], i))  # least similar first
    cuts = set(ranked[: unique_blocks - 1])
    share_map, first = [], 0
    for position in range(count):
        if position > 0 and position - 1 in cuts:
            first = position
        share_map.append(first)
    return share_map
