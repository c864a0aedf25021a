"""Settings of the least-squares refit that the structured pruning passes share (llmshrink/refit_output.py)."""

from __future__ import annotations

from pydantic import Field

from llmshrink.passes.base import PassConfig


class RefitOutputConfig(PassConfig):
    refit_output: bool = Field(
        False, description="re-solve each pruned block's output projection by least squares so that the kept "
        "units reproduce the whole block's output on refit_tokens of data: (llmshrink/refit_output.py)",
    )
    refit_tokens: int = Field(8192, ge=16, description="tokens for refit_output, spread over the whole of data:")
