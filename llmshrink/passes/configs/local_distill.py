"""The local_distill pass's settings, torch-free (validate reads them); the pass: passes/local_distill.py."""

from __future__ import annotations

from pydantic import Field

from llmshrink.fields import BlockIndices, Exclude, Regex
from llmshrink.passes.base import TrainingConfig
from llmshrink.registry import register_pass


@register_pass("local_distill")
class LocalDistillConfig(TrainingConfig):
    lr: float = Field(1e-3, gt=0.0, description="higher than distill's: each layer fits a fixed target")
    warmup_steps: int = Field(5, ge=0, description="linear warmup, then cosine decay to zero")
    targets: Regex = Field(".*", description="regex over the full names of the compressed layers to fit")
    exclude: Exclude = None
    layers: BlockIndices = None
