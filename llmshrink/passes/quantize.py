"""quantize pass: lower the precision of the weights.

    method: fp16 | bf16      cast the whole model (every parameter and float buffer); checkpoints are saved and
                             rebuilt in that dtype
    method: int8-dynamic     each targeted Linear/Conv1D becomes an Int8DynamicLinear: int8 weights with one scale
                             per output channel, activations quantized at run time, fbgemm's int8 GEMM on CPU. By
                             default only the layers inside the blocks: the (often tied) lm_head and embeddings,
                             the most sensitive layers, stay in float

llmshrink's own compressed layers (Kronecker, low-rank, ...) are left in their precision and listed in the record
(`kept`). Not built yet, and refused when the recipe is read: bnb-nf4, bnb-fp4, bnb-int8 (bitsandbytes) and mixed
(per-layer bit widths from a sensitivity measure).
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from torch import nn
from tqdm.auto import tqdm

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.int8_dynamic import Int8DynamicLinear, dense_weight
from llmshrink.passes.base import PassConfig, PassRecord
from llmshrink.registry import register_pass
from llmshrink.targeting import find_targets, replace_module, shared_weight_names

BUILT = ("fp16", "bf16", "int8-dynamic")
PLANNED = ("bnb-nf4", "bnb-fp4", "bnb-int8", "mixed")
CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


class QuantizeConfig(PassConfig):
    method: str = Field(..., description=f"one of {', '.join(BUILT)} ({', '.join(PLANNED)}: not built yet)")
    targets: str = Field(
        r".*\.\d+\..*", description="int8-dynamic: regex over full Linear/Conv1D names (default: inside the blocks)"
    )
    exclude: str | None = Field(None, description="int8-dynamic: regex of layer names to leave in float")

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        if method in PLANNED:
            raise PydanticCustomError(
                "not_built", f"{method!r} is not built yet in this version; available: {', '.join(BUILT)}"
            )
        if method not in BUILT:
            raise PydanticCustomError("method", f"{method!r} is not a method; allowed: {', '.join(BUILT + PLANNED)}")
        return method


def apply(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> PassRecord:
    if cfg.method in CASTS:
        return cast(model, CASTS[cfg.method], cfg.method)
    return int8_dynamic(model, cfg, ctx)


def cast(model: nn.Module, dtype: torch.dtype, method: str) -> PassRecord:
    if any(isinstance(m, Int8DynamicLinear) for m in model.modules()):
        raise LlmshrinkError(f"quantize.method: {method} after int8-dynamic is not supported; cast first")
    before = _tensor_bytes(model)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    if dtypes != ["float32"] and dtypes != [str(dtype).removeprefix("torch.")]:
        # The checkpoint rebuilds the model in one dtype, so a model that already mixes them cannot be cast.
        raise LlmshrinkError(f"quantize.method: {method} needs a float32 model; its parameters are {dtypes}")
    # As a model built in that dtype has them (so the checkpoint reloads exactly): buffers that are computed,
    # not saved, such as rotary frequencies, stay as they were.
    computed = [(m, name, m._buffers[name]) for m in model.modules() for name in m._non_persistent_buffers_set
                if m._buffers.get(name) is not None]
    model.to(dtype)
    for module, name, buffer in computed:
        module._buffers[name] = buffer
    return {"method": method, "dtype": str(dtype).removeprefix("torch."), "bytes_before": before,
            "bytes_after": _tensor_bytes(model)}


def int8_dynamic(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> PassRecord:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        ctx.log("  quantize: no fbgemm on this machine: Int8DynamicLinear computes with dequantized weights")
    targets = find_targets(model, cfg.targets, cfg.exclude, field="quantize.targets")
    for name, module in targets:
        tied_to = shared_weight_names(model, name)
        if tied_to:
            raise LlmshrinkError(
                f"quantize.targets: {name} shares its weight with {', '.join(tied_to)} (tied embeddings); "
                "exclude it (the default targets do)"
            )
        if dense_weight(module).dtype != torch.float32:
            raise LlmshrinkError(f"quantize.method: int8-dynamic needs float32 layers; {name} is "
                                 f"{str(dense_weight(module).dtype).removeprefix('torch.')}")
    layers = []
    for name, module in tqdm(targets, desc="quantize", unit="layer", leave=False):
        weight = dense_weight(module)
        new = Int8DynamicLinear.from_linear(module)
        with torch.no_grad():
            error = float((new.to_dense() - weight.float()).norm() / weight.float().norm().clamp(min=1e-30))
        replace_module(model, name, new)
        layers.append({"name": name, "shape": list(weight.shape), "rel_error": round(error, 6),
                       "bytes_before": _tensor_bytes(module), "bytes_after": _tensor_bytes(new)})
    from llmshrink.modules import COMPRESSED_MODULES

    others = tuple(cls for cls in COMPRESSED_MODULES.values() if cls is not Int8DynamicLinear)
    kept = [name for name, m in model.named_modules() if others and isinstance(m, others)]
    ctx.log(f"  quantize: {len(layers)} layers to int8 (per-channel), mean rel. weight error "
            f"{sum(layer['rel_error'] for layer in layers) / len(layers):.4f}"
            + (f"; {len(kept)} compressed layers kept in their precision" if kept else ""))
    before, after = sum(lay["bytes_before"] for lay in layers), sum(lay["bytes_after"] for lay in layers)
    return {"method": cfg.method, "layers": layers, "kept": kept, "bytes_before": before, "bytes_after": after,
            "ratio": round(after / before, 6)}


def _tensor_bytes(module: nn.Module) -> int:
    """Bytes of what a checkpoint stores (parameters and saved buffers), each tensor once (tied weights once)."""
    seen = {id(t): t for t in module.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in seen.values())


register_pass("quantize", QuantizeConfig, apply)
