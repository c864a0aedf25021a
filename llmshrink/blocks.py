"""The block stack of a supported transformer (the ModuleList of its decoder or encoder layers), shared by the
passes that restructure it (share_layers, drop_layers)."""

from __future__ import annotations

from torch import nn

from llmshrink.errors import LlmshrinkError
from llmshrink.modules.shared_block import SharedBlockRef

# Where each family keeps its blocks, relative to the base model (model.model, model.transformer, model.bert).
BLOCK_LISTS = (("layers", "Llama-family"), ("h", "GPT-2"), ("encoder.layer", "BERT-family"))
SUPPORTED = "Llama-family (model.layers), GPT-2 (transformer.h), BERT-family (encoder.layer)"


def find_blocks(model: nn.Module, pass_name: str = "share_layers") -> tuple[str, str, nn.ModuleList]:
    """(full name, family, the block list) of a supported model; refuses one that already shares (its refs
    name their block by position, which neither a second sharing nor removing blocks may shift)."""
    base = getattr(model, "base_model", model)
    for relative, family in BLOCK_LISTS:
        try:
            blocks = base.get_submodule(relative)
        except AttributeError:
            continue
        if not isinstance(blocks, nn.ModuleList) or not len(blocks):
            continue
        name = next(n for n, m in model.named_modules() if m is blocks)
        refs = [i for i, block in enumerate(blocks) if isinstance(block, SharedBlockRef)]
        if refs:
            hint = "apply share_layers once" if pass_name == "share_layers" else f"run {pass_name} before share_layers"
            raise LlmshrinkError(
                f"{pass_name}: {name} already shares blocks (position {refs[0]} runs {blocks[refs[0]].target}); {hint}"
            )
        return name, family, blocks
    raise LlmshrinkError(f"{pass_name}: {type(model).__name__} is not supported; supported: {SUPPORTED}")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a shared tensor once
