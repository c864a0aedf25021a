"""Which modules a pass touches: a regex over module names, an optional layer filter; and the generic helpers
that read and change them (a dense layer's weight, replacing a module, plain attributes checkpoints record).

Dense layers are nn.Linear and GPT-2's Conv1D (transposed weight, fused qkv in `c_attn`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from llmshrink.errors import LlmshrinkError

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# Name of the dict, on a module, of the plain attributes a pass changed (see set_module_attrs).
MODULE_ATTRS = "llmshrink_attrs"


def is_dense_layer(module: nn.Module) -> bool:
    """A float Linear/Conv1D whose weight a pass may read (bitsandbytes' layers subclass Linear but pack it)."""
    return (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") and not is_bnb_layer(module)


def is_bnb_layer(module: nn.Module) -> bool:
    # By module path, so that checking a model without bnb layers never imports bitsandbytes.
    return type(module).__module__.startswith("bitsandbytes.")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of nn.Linear or GPT-2 Conv1D (which stores in x out)."""
    if type(layer).__name__ == "Conv1D":
        return layer.weight.detach().T
    return layer.weight.detach()


def layer_index(name: str) -> int | None:
    """The block number in a module name (`model.layers.7.mlp.up_proj` -> 7), if any."""
    found = _LAYER_INDEX.search(f".{name}.")
    return int(found.group(1)) if found else None


def require_causal_lm(model: nn.Module, reason: str, instead: str) -> None:
    """Refuse in one line a setting that measures or trains next-token prediction (`reason`: "<field>: <what it
    does>") on a model that has none, such as an encoder; `instead` names what to do."""
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise LlmshrinkError(f"{reason} and {type(model).__name__} is not a causal language model; {instead}")


def find_targets(
    model: nn.Module,
    targets: str,
    exclude: str | None = None,
    layers: list[int] | None = None,
    field: str = "targets",
) -> list[tuple[str, nn.Module]]:
    """Dense layers whose full name matches `targets` (and not `exclude`), in model order."""
    chosen = []
    for name, module in model.named_modules():
        if not is_dense_layer(module) or not re.fullmatch(targets, name):
            continue
        if exclude and re.fullmatch(exclude, name):
            continue
        if layers is not None and layer_index(name) not in layers:
            continue
        chosen.append((name, module))
    if not chosen:
        examples = [n for n, m in model.named_modules() if is_dense_layer(m)][:4]
        raise LlmshrinkError(
            f"{field}: {targets!r} matches no Linear/Conv1D layer"
            + (f" in layers {layers}" if layers is not None else "")
            + f"; layer names look like {', '.join(examples)}"
        )
    return chosen


def token_windows(model: nn.Module, ids: torch.Tensor, size: int = 256) -> Iterator[torch.Tensor]:
    """The token ids `ids` (1-D) in consecutive windows of `size` tokens, no longer than the model's
    max_position_embeddings, each on the model's device."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or ids.numel()
    window = max(1, min(size, ids.numel(), positions))
    device = next(model.parameters()).device
    for start in range(0, ids.numel(), window):
        yield ids[start : start + window].to(device)


@contextmanager
def hooked_eval(model: nn.Module, handles: list) -> Iterator[None]:
    """The model in eval mode meanwhile; then, even after an error, its hooks `handles` removed and its
    training mode as before."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def find_embeddings(model: nn.Module, pattern: str, exclude: str | None, field: str) -> list[tuple[str, nn.Embedding]]:
    """Plain nn.Embedding tables whose full name matches `pattern` (and not `exclude`), in model order. A subclass
    (Gemma's scales its rows in its own forward) or a table with max_norm (renormalised on lookup) is refused: a
    compressed table would not do what it does."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    chosen = [(name, m) for name, m in found
              if re.fullmatch(pattern, name) and not (exclude and re.fullmatch(exclude, name))]
    if not chosen:
        raise LlmshrinkError(f"{field}: {pattern!r} matches no nn.Embedding; embeddings are named like "
                             f"{', '.join(name for name, _ in found[:4]) or '(none in this model)'}")
    for name, module in chosen:
        if type(module) is not nn.Embedding or module.max_norm is not None:
            what = "has max_norm" if type(module) is nn.Embedding else f"is a {type(module).__name__}"
            raise LlmshrinkError(f"{field}: {name} {what}, not a plain nn.Embedding; exclude it")
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def shared_weight_names(model: nn.Module, name: str) -> list[str]:
    """Other modules whose weight is the same tensor as `name`'s (e.g. a tied lm_head and embedding).

    Only weight parameters are compared: a weight that is a property (Int8Embedding's) builds a new tensor on
    each read, which is never another module's, and reading it would dequantize a whole table."""
    weight = model.get_submodule(name).weight
    return [
        other
        for other, module in model.named_modules()
        if other != name and dict(module.named_parameters(recurse=False)).get("weight") is weight
    ]


def check_tied(
    model: nn.Module, targets: list[tuple[str, nn.Module]], policy: str, pass_name: str, verb: str,
    note: str | None = "the other stays dense", field: str = "targets",
) -> list[str]:
    """The targets whose weight is tied to another module (a tied lm_head and embedding), for `untie`; with
    policy "refuse", the first of them is an error instead, before the pass changed anything.

    The error reads `<pass_name>.<field>: <name> shares its weight with <others> (tied embeddings); exclude it,
    or set tied_embeddings: untie to <verb> alone (<note>)`; `{others}` in the note names the others.
    """
    tied = []
    for name, _ in targets:
        tied_to = shared_weight_names(model, name)
        if not tied_to:
            continue
        if policy == "refuse":
            others = ", ".join(tied_to)
            raise LlmshrinkError(
                f"{pass_name}.{field}: {name} shares its weight with {others} (tied embeddings); "
                f"exclude it, or set tied_embeddings: untie to {verb} alone"
                + (f" ({note.format(others=others)})" if note else "")
            )
        tied.append(name)
    return tied


def untie_targets(model: nn.Module, targets: list[tuple[str, nn.Module]], policy: str, pass_name: str,
                  verb: str) -> list[str]:
    """check_tied, then untie each tied target (policy "untie"); returns their names."""
    tied = check_tied(model, targets, policy, pass_name, verb)
    for name in tied:
        untie(model, name)
    return tied


def untie(model: nn.Module, name: str) -> None:
    """Give the layer `name` its own copy of a weight it shares (the other module keeps the tensor), and tell
    the model config so, so that saving and reloading keep them apart."""
    module = model.get_submodule(name)
    weight = module.weight
    module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False


def set_module_attrs(module: nn.Module, **values: Any) -> None:
    """Set plain attributes (JSON values) that the model config no longer implies, and remember them.

    E.g. a GPT-2 attention keeping 3 of 12 heads reads `split_size` at forward time; checkpoints record
    these (`module_attrs`) and set them again after rebuilding the model.
    """
    for key, value in values.items():
        setattr(module, key, value)
    setattr(module, MODULE_ATTRS, {**module.__dict__.get(MODULE_ATTRS, {}), **values})


def module_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{dotted name: {attribute: value}} for every module with attributes set by set_module_attrs."""
    return {name: dict(m.__dict__[MODULE_ATTRS]) for name, m in model.named_modules() if m.__dict__.get(MODULE_ATTRS)}
