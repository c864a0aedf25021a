"""What a training pass switches on a model for its run and puts back afterwards: which parameters train
(requires_grad), and the attention implementation (eager, to get attention maps)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from llmshrink.errors import LlmshrinkError


@contextmanager
def trainable_params(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """The parameters that train (those with requires_grad: frozen ones, e.g. quantized, stay frozen); the
    caller may change the flags inside; they are put back afterwards, and the model left in eval mode."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        yield [p for p, flag in saved.items() if flag]
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.eval()


@contextmanager
def eager_attention(models: Sequence[nn.Module | None], what: str) -> Iterator[None]:
    """Switch the models (None: skipped) to eager attention, the only kind that returns attention maps
    (transformers 5 returns none under sdpa), then back. `what` names the pass in the error."""
    previous = []
    try:
        for m in models:
            impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
            if m is None or impl == "eager":
                continue
            cannot = LlmshrinkError(f"{what}: attention_weight > 0 needs eager attention, and {type(m).__name__} "
                                    "cannot switch to it; set attention_weight: 0")
            if impl is None or not hasattr(m, "set_attn_implementation"):
                raise cannot
            previous.append((m, impl))
            m.set_attn_implementation("eager")
            if m.config._attn_implementation != "eager":
                raise cannot
        yield
    finally:
        for m, impl in reversed(previous):
            m.set_attn_implementation(impl)
