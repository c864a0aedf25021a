"""The qat pass's settings, torch-free (validate reads them); the pass: passes/qat.py."""

from __future__ import annotations

from pydantic import Field

from llmshrink.fields import BlockIndices, Exclude, Regex
from llmshrink.passes.base import PassConfig
from llmshrink.registry import register_pass


@register_pass("qat")
class QatConfig(PassConfig):
    targets: Regex = Field(r".*\.\d+\..*", description="regex over full Linear/Conv1D names (default: inside the "
                         "blocks, the layers quantize's int8-dynamic converts by default)")
    exclude: Exclude = None
    layers: BlockIndices = None
    activations: bool = Field(False, description="also round each layer's input as the int8 kernel will")
