"""The block stack of a supported transformer (the ModuleList of its decoder or encoder layers), shared by the
passes that restructure it (share_layers, drop_layers). Where the stack lives is the model's Family
(llmshrink/families.py), chosen by config.model_type."""

from __future__ import annotations

from torch import nn

from llmshrink.errors import LlmshrinkError
from llmshrink.families import block_list, family_of
from llmshrink.modules.shared_block import SharedBlockRef


def find_blocks(model: nn.Module, pass_name: str = "share_layers") -> tuple[str, str, nn.ModuleList]:
    """(full name, family name, the block list) of a supported model; refuses one that already shares (its
    refs name their block by position, which neither a second sharing nor removing blocks may shift)."""
    family = family_of(model, pass_name)
    name, blocks = block_list(model, family, pass_name)
    refs = [i for i, block in enumerate(blocks) if isinstance(block, SharedBlockRef)]
    if refs:
        hint = "apply share_layers once" if pass_name == "share_layers" else f"run {pass_name} before share_layers"
        raise LlmshrinkError(
            f"{pass_name}: {name} already shares blocks (position {refs[0]} runs {blocks[refs[0]].target}); {hint}"
        )
    return name, family.name, blocks


def per_block_lists(model: nn.Module, list_name: str, count: int, pass_name: str) -> dict[str, list]:
    """{attribute: entries} of the config lists with one entry per block (the family's per_block_config, e.g.
    Gemma 3's layer_types) that this model's config sets; a list of another length than the block list is
    refused, as entries could not be matched to blocks."""
    config = getattr(model, "config", None)
    lists = {}
    for attribute in family_of(model, pass_name).per_block_config:
        value = getattr(config, attribute, None)
        if not isinstance(value, (list, tuple)):
            continue  # not set (None), or not a per-block list in this config
        if len(value) != count:
            raise LlmshrinkError(
                f"{pass_name}: config.{attribute} has {len(value)} entries for the {count} blocks of {list_name}; "
                "is it a modified model?"
            )
        lists[attribute] = list(value)
    return lists


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a shared tensor once
