"""Which blocks can a pass compress with the least damage? Try each, measure, put it back.

Used by passes that take `select_layers: N`: every candidate block's target layers are swapped for
their compressed replacements one block at a time, the calibration perplexity is measured, and the
originals are restored. The N blocks whose compression raised perplexity least are chosen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from llmshrink.targeting import layer_index, replace_module


def group_by_layer(targets: list[tuple[str, nn.Module]]) -> dict[int, list[tuple[str, nn.Module]]]:
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in targets:
        index = layer_index(name)
        if index is not None:
            groups.setdefault(index, []).append((name, module))
    return groups


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    groups: dict[int, list[tuple[str, nn.Module]]],
    compress: Callable[[str, nn.Module], nn.Module],
    token_ids: torch.Tensor,
    window: int = 256,
    desc: str = "sensitivity",
    unit: str = "block",
) -> dict[int, float]:
    """Calibration perplexity with each group's targets compressed (the others left as they are).

    Groups are usually blocks; any int key works (quantize's mixed method measures one layer per group).
    """
    from llmshrink.eval.perplexity import perplexity

    device = next(model.parameters()).device  # where the model runs: the tokens follow it
    scores = {}
    for index, members in tqdm(sorted(groups.items()), desc=desc, unit=unit, leave=False):
        for name, module in members:
            replace_module(model, name, compress(name, module))
        try:
            scores[index] = perplexity(model, token_ids, window, window, device=device, progress=False).ppl
        finally:
            for name, module in members:
                replace_module(model, name, module)
    return scores


def least_sensitive(scores: dict[int, float], count: int) -> list[int]:
    """The `count` blocks with the lowest perplexity when compressed, in block order."""
    return sorted(sorted(scores, key=scores.__getitem__)[:count])
