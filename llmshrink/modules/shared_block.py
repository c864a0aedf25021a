"""SharedBlockRef: one position of a block list that runs another position's block (layer sharing).

MobileLLM-style sharing keeps one block for several positions of the decoder stack. The first
position of a group holds the block itself; every other position holds a SharedBlockRef naming it:

    model.layers = [block0, SharedBlockRef("model.layers.0", 1), block2, SharedBlockRef("model.layers.2", 3)]

The ref keeps the block out of its own submodules, so the block's parameters are counted, trained
and saved once, under the first position's name. A checkpoint records the ref as a layout entry
{type: SharedBlockRef, args: {target, position}}; after the layout is applied, `bind(model)` points it
at the (already rebuilt) target, and the target's weights load as usual.

Attention layers carry `layer_idx`, the slot they read and write in the KV cache. Running one block
at two positions with one index would let the second call overwrite the first's cache entries, so a
ref runs the block with every `layer_idx` inside it set to the ref's position, and restores them after.

This file imports only torch: it is copied verbatim into checkpoints as remote code.
"""

from __future__ import annotations

from torch import nn


class SharedBlockRef(nn.Module):
    """Runs the module named `target` (another position of the same block list) at `position`."""

    def __init__(self, target: str, position: int):
        super().__init__()
        self.target = target
        self.position = int(position)
        # Stored outside _modules on purpose: the block belongs to (and is saved under) its own position.
        self.__dict__["_block"] = None

    @property
    def block(self) -> nn.Module:
        block = self.__dict__["_block"]
        if block is None:
            raise RuntimeError(f"SharedBlockRef at position {self.position}: not bound to {self.target} yet")
        return block

    def bind(self, model: nn.Module) -> None:
        """Point at `target` inside `model` (the root module whose names the layout uses)."""
        try:
            block = model.get_submodule(self.target)
        except AttributeError:
            raise ValueError(f"no module {self.target} to share") from None
        if isinstance(block, SharedBlockRef):
            raise ValueError(f"{self.target} is itself a SharedBlockRef; point at the block it runs")
        self.__dict__["_block"] = block

    def forward(self, *args, **kwargs):
        block = self.block
        indexed = [
            (m, m.layer_idx)
            for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)
        ]
        for module, _ in indexed:
            module.layer_idx = self.position  # this position's own KV-cache slot
        try:
            return block(*args, **kwargs)
        finally:
            for module, index in indexed:
                module.layer_idx = index

    def layout_args(self) -> dict:
        """Constructor arguments, as JSON, so a checkpoint can rebuild this position before loading."""
        return {"target": self.target, "position": self.position}

    def extra_repr(self) -> str:
        return f"target={self.target}, position={self.position}"


COMPRESSED = (SharedBlockRef,)
