"""The recipe's `export:` section: formats `apply` writes at the end, beside the checkpoint (torch-free).

    export:
      - {format: hf-dense}                 # a plain transformers model      -> <output>/exports/hf-dense/
      - {format: gguf, quant: q8_0}        # one GGUF file for llama.cpp     -> <output>/exports/gguf-q8_0/
      - {format: onnx, name: onnx-fp32}    # one ONNX graph (fp32 here)      -> <output>/exports/onnx-fp32/

The quant names live here, not in the export modules (which import torch and their runtimes), so that validating
a recipe checks them without importing either; the modules take their names from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from llmshrink.fields import first_repeat
from llmshrink.specs import Spec

FORMATS = ("hf-dense", "gguf", "onnx")
# gguf: llama.cpp file types (gguf.QUANTS maps them); f16 when none is given.
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k")
GGUF_DEFAULT = "f16"
# onnx: onnxruntime's quantizations (onnx.QUANTS describes them); none: the fp32 graph.
ONNX_QUANTS = ("int8", "int8-weights", "int4-weights")
# The formats an encoder (model.task other than causal_lm) exports to: llama.cpp's graphs here are decoders.
ENCODER_FORMATS = ("hf-dense", "onnx")
EXPORTS_DIR = "exports"  # inside the output folder: exports/<name>/
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ExportSpec(Spec):
    """One export of the compressed checkpoint, written by `apply` into <output>/exports/<name>/."""

    format: Literal["hf-dense", "gguf", "onnx"] = Field(description="hf-dense, gguf or onnx")
    quant: str | None = Field(None, description=f"gguf: {', '.join(GGUF_QUANTS)} (default {GGUF_DEFAULT}); onnx: "
                                                f"{', '.join(ONNX_QUANTS)} (default: fp32); hf-dense: none")
    name: str | None = Field(None, pattern=_NAME, description="the folder under exports/ (default <format> or "
                                                                "<format>-<quant>)")

    @field_validator("quant")
    @classmethod
    def _quant_of_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        fmt = info.data.get("format")
        if value is None or fmt is None:
            return value
        if fmt == "hf-dense":
            raise PydanticCustomError("quant", "hf-dense keeps the checkpoint's dtype (remove quant, or quantize "
                                               "with format gguf or onnx)")
        allowed = GGUF_QUANTS if fmt == "gguf" else ONNX_QUANTS
        if value not in allowed:
            raise PydanticCustomError("quant", "{fmt} takes one of {allowed}", {"fmt": fmt, "allowed": ", ".join(
                allowed)})
        return value

    @property
    def folder(self) -> str:
        """The export's folder name under exports/ (and its key in the manifest's `exports`)."""
        return self.name or (f"{self.format}-{self.quant}" if self.quant else self.format)


def check_export_names(exports: list[ExportSpec]) -> list[ExportSpec]:
    """Each export's folder is its own (pydantic's duplicate_name error, which describe_error places at .name)."""
    repeat = first_repeat([spec.folder for spec in exports])
    if repeat is not None:
        index, first = repeat
        raise PydanticCustomError("duplicate_name", "duplicate export folder '{name}' (also export[{first}]); give one "
                                  "of them a name:", {"name": exports[index].folder, "first": first, "index": index})
    return exports


def check_exports(exports: list[ExportSpec], causal_lm: bool) -> tuple[str, str] | None:
    """(field, message) for an export the model cannot take, known before it loads: an encoder to gguf."""
    if causal_lm:
        return None
    for index, spec in enumerate(exports):
        if spec.format not in ENCODER_FORMATS:
            return (f"export[{index}].format", f"{spec.format} holds decoders (causal LMs); an encoder exports to "
                                               f"{' or '.join(ENCODER_FORMATS)}")
    return None
