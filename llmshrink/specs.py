"""Typed recipe sections that several modules read: where a model and a text come from.

These are pydantic models with extra="forbid" (a misspelt key is an error, never ignored) and strict types
(`add_bos: 1` or `max_tokens: "512"` is an error, not silently converted; an int is still a valid float).
Torch-free: validating a recipe imports them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmshrink.fields import Template


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSpec(Spec):
    """The base model: a hub id, a local directory, a .gguf file, or a built-in name."""

    id: str = Field("builtin:smollm2-135m", description="hub id, local dir, .gguf file or builtin:NAME")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class DataSpec(Spec):
    """A text source: `heldout` documents set aside, the rest cut to `fraction` and then to `max_tokens`.

    All choices are deterministic in `seed`; what a document is: llmshrink.distill.data.
    """

    source: str = Field(
        "builtin:shakespeare",
        description="builtin:NAME, a datasets hub id, or a local .txt/.jsonl/.json/.parquet file",
    )
    config: str | None = Field(None, description="datasets config name, e.g. wikitext-103-raw-v1")
    split: str = "train"
    text_field: str = "text"
    template: Template | None = Field(
        None, description="make each record's document from its fields, e.g. "
        "'Summarize the dialogue.\\n{dialogue}\\nSummary: {summary}' (instead of text_field; not for .txt)",
    )
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    seed: int = 0
    heldout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="fraction of documents held out of training, for evaluation during training",
    )
    streaming: bool = Field(
        False, description="read documents one by one and stop at max_tokens (needs max_tokens)",
    )
