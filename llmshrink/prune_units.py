"""What prune_ffn and prune_heads share (passes may not import each other): which blocks a recipe's
`targets` / `exclude` / `layers` choose, finding a family's layers in them, the index math of attention heads, and how many units
each layer keeps (select_units).

Heads: query head h owns features h·d..(h+1)·d of the query projection and of the output projection's
input (d: head size); with GQA, `group` consecutive query heads share key-value head h // group.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from llmshrink.errors import LlmshrinkError
from llmshrink.targeting import is_dense_layer


def choose_blocks(
    found: list[tuple[int, str]],
    targets: str,
    exclude: str | None,
    layers: list[int] | None,
    pass_name: str,
    what: str,
    model_name: str,
) -> list[tuple[int, str]]:
    """The (block index, name) pairs of `found` whose name fullmatches `targets`, not `exclude`, in `layers`.

    Choosing nothing is a one-line error naming the field that emptied the choice and the names present.
    """
    chosen = [(i, name) for i, name in found if re.fullmatch(targets, name)]
    if not chosen:
        raise LlmshrinkError(
            f"{pass_name}.targets: {targets!r} matches no {what}; {model_name} has {_examples(found)}"
        )
    if exclude is not None:
        matched, chosen = chosen, [(i, name) for i, name in chosen if not re.fullmatch(exclude, name)]
        if not chosen:
            raise LlmshrinkError(
                f"{pass_name}.exclude: {exclude!r} excludes every {what} that targets {targets!r} matches: "
                f"{_examples(matched)}"
            )
    if layers is not None:
        narrowed = len(chosen) < len(found)
        present = [i for i, _ in chosen]
        chosen = [(i, name) for i, name in chosen if i in layers]
        if not chosen:
            where = (f"; targets / exclude leave blocks {present}" if narrowed
                     else f"; {model_name} has blocks {present}")
            raise LlmshrinkError(f"{pass_name}.layers: {layers} match no {what}{where}")
    return chosen


def family_module(model: nn.Module, name: str, pass_name: str, role: str) -> nn.Module:
    """The module where the model's family keeps `role` (e.g. "an FFN projection"), or one line saying it is not."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LlmshrinkError(
            f"{pass_name}: {type(model).__name__} has no {name}, where its family keeps {role}; is it a modified model?"
        ) from None


def check_dense(model: nn.Module, names: tuple[str, ...], pass_name: str, role: str) -> None:
    """Each layer must still be a plain Linear/Conv1D: a pass that ran before may have replaced it."""
    for name in names:
        module = family_module(model, name, pass_name, role)
        if not is_dense_layer(module):
            raise LlmshrinkError(
                f"{pass_name}: {name} is a {type(module).__name__}, not Linear/Conv1D; "
                f"run {pass_name} before passes that replace it"
            )


def _examples(found: list[tuple[int, str]]) -> str:
    names = [name for _, name in found]
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def head_features(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices (rows of a q/k/v projection, columns of the output one) of `heads`, in order."""
    heads = torch.as_tensor(heads).long()
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def group_heads(groups: torch.Tensor, group: int) -> torch.Tensor:
    """The query heads of kv groups `groups`, in order."""
    groups = torch.as_tensor(groups).long()
    return (groups[:, None] * group + torch.arange(group)).reshape(-1)


def slot_scores(head_scores: torch.Tensor, group: int) -> torch.Tensor:
    """Scores of keeping 1, 2, ... query heads in every kv group: slot r sums each group's r-th best head.

    Keeping the best k slots keeps every group's best k heads, so GQA stays regular; slot scores never
    increase, so any selection of slots by score is a prefix.
    """
    per_group = head_scores.double().reshape(-1, group)
    return torch.sort(per_group, dim=1, descending=True, stable=True).values.sum(0)


def heads_in_slots(head_scores: torch.Tensor, group: int, slots: int) -> torch.Tensor:
    """Sorted indices of the query heads kept when every kv group keeps its best `slots` heads
    (ties keep the lower index)."""
    per_group = head_scores.double().reshape(-1, group)
    best = torch.sort(per_group, dim=1, descending=True, stable=True).indices[:, :slots].sort(dim=1).values
    return (best + torch.arange(per_group.shape[0])[:, None] * group).reshape(-1)


# --- prune_heads' budget --------------------------------------------------------------------------


def select_units(
    scores: dict[str, torch.Tensor], keep: float, scope: str, normalize: str = "layer_mean"
) -> dict[str, torch.Tensor]:
    """Sorted indices of the units each layer keeps: floor(keep x units), at least one per layer.

    per_layer counts each layer alone; global keeps floor(keep x all units): each layer's best unit,
    then the best of the rest across layers (scores divided by their layer's mean, unless normalize
    is "none"; ties: earlier layer, then lower index).
    """

    def count(n: int) -> int:
        return max(1, math.floor(keep * n + 1e-9))  # 1e-9: 0.7 x 10 is 6.999...

    if scope == "per_layer":
        return {name: top(score, count(score.numel())) for name, score in scores.items()}
    taken = {name: 1 for name in scores}
    rest = []
    for position, (name, score) in enumerate(scores.items()):
        score = score.double().cpu()
        mean = score.mean()
        if normalize == "layer_mean" and mean > 0:
            score = score / mean
        ranked = torch.sort(score, descending=True, stable=True).values
        rest += [(-value, position, rank, name) for rank, value in enumerate(ranked[1:].tolist(), start=1)]
    rest.sort()
    budget = count(sum(score.numel() for score in scores.values())) - len(scores)
    for _, _, _, name in rest[: max(0, budget)]:
        taken[name] += 1  # a layer's units are taken in its own order, so its count is all that matters
    return {name: top(score, taken[name]) for name, score in scores.items()}


def top(score: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted indices of the `count` best units (ties keep the lower index)."""
    return torch.sort(score, descending=True, stable=True).indices[:count].sort().values
