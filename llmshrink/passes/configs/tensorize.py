"""The tensorize pass's settings, torch-free (validate reads them); the pass: passes/tensorize.py."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from llmshrink.fields import AsTuple, BlockIndices, Exclude, Regex
from llmshrink.passes.base import PassConfig
from llmshrink.registry import register_pass

DEFAULT_RATIO = 0.25
RANK_ENTRIES = {"tucker": "one per mode", "cp": "one", "tt": "one per bond between neighbouring modes"}


@register_pass("tensorize")
class TensorizeConfig(PassConfig):
    targets: Regex = Field(r".*\.mlp\..*", description="regex over full module names (Linear or Conv1D)")
    exclude: Exclude = None
    layers: BlockIndices = None
    method: Literal["tucker", "cp", "tt"] = Field("tt", description="Tucker, CP (parafac) or tensor-train")
    shape: Annotated[tuple[list[int], list[int]] | dict[int, list[int]] | None, AsTuple] = Field(
        None,
        description="[[out factors], [in factors]] for every target, or {dimension: factors} (e.g. "
        "{1536: [32, 48], 576: [24, 24]}) for targets of several shapes; unset dimensions are split evenly",
    )
    modes_per_side: int = Field(2, ge=1, description="factors of out and of in when the shape is automatic")
    rank: int | list[int] | None = Field(
        None,
        description="an int caps every rank (tucker: per mode, tt: per bond, cp: terms); a list gives them "
        "exactly (tucker: one per mode, tt: one per bond, cp: one)",
    )
    ratio: float | None = Field(
        None, gt=0.0, description=f"params budget per layer; the largest uniform rank that fits (default "
        f"{DEFAULT_RATIO} when rank is unset)"
    )
    randomized: bool = Field(
        False, description="randomised SVD (tucker, tt) / random init (cp): faster, slightly less accurate"
    )
    n_iter_max: int = Field(100, ge=1, description="HOOI (tucker) / ALS (cp) iterations at most")
    tied_embeddings: Literal["refuse", "untie"] = Field(
        "refuse", description="what to do with a target whose weight is tied to another module"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TensorizeConfig:
        if self.rank is not None and self.ratio is not None:
            raise ValueError("set rank or ratio, not both")
        ranks = [self.rank] if isinstance(self.rank, int) else self.rank or []
        if any(r < 1 for r in ranks) or self.rank == []:
            raise ValueError(f"rank must be positive integers, got {self.rank}")
        pairs = list(self.shape.items()) if isinstance(self.shape, dict) else []
        if self.shape is not None and not isinstance(self.shape, dict):
            pairs = [(None, self.shape[0]), (None, self.shape[1])]
        for dim, factors in pairs:
            if not factors or min(factors) < 1 or (dim is not None and math.prod(factors) != dim):
                raise ValueError(f"shape: factors {factors} must be positive integers" +
                                 (f" whose product is {dim}" if dim is not None else ""))
        modes = self._modes()
        if isinstance(self.rank, list) and modes is not None:
            needed = {"tucker": modes, "tt": modes - 1, "cp": 1}[self.method]
            if len(self.rank) != needed:  # the same rule choose_ranks applies per layer, caught before loading
                raise ValueError(f"rank {self.rank} has {len(self.rank)} entries; {self.method} on a {modes}-mode "
                                 f"tensor needs {needed} ({RANK_ENTRIES[self.method]})")
        return self

    def _modes(self) -> int | None:
        """Modes of every target's tensor when the config alone fixes them (None: it depends on the layer)."""
        if self.shape is None:
            return 2 * self.modes_per_side
        if not isinstance(self.shape, dict):
            return len(self.shape[0]) + len(self.shape[1])
        counts = {len(factors) for factors in self.shape.values()}
        return 2 * self.modes_per_side if counts <= {self.modes_per_side} else None
