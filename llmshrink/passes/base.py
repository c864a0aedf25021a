"""What every pass shares: a frozen config model and a JSON-serialisable record."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

# A record is every decision a pass made, as plain JSON data (dicts, lists, numbers, strings).
PassRecord = dict[str, Any]


class PassConfig(BaseModel):
    """Base of all pass configs: unknown keys are errors, values cannot change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
