"""quantize pass: lower the precision of the weights.

    method: fp16 | bf16      cast the whole model (every parameter and float buffer); checkpoints are saved and
                             rebuilt in that dtype
    method: int8-dynamic     each targeted Linear/Conv1D becomes an Int8DynamicLinear: int8 weights with one scale
                             per output channel, activations quantized at run time, fbgemm's int8 GEMM on CPU. By
                             default only the layers inside the blocks: the (often tied) lm_head and embeddings,
                             the most sensitive layers, stay in float. With embeddings: true, the nn.Embedding
                             tables named by embedding_targets (default: BERT's word/position/token-type
                             embeddings, Llama-style embed_tokens) become Int8Embedding too: int8 rows, one fp32
                             scale per row, only the looked-up rows dequantized; a table tied to the lm_head
                             is refused unless tied_embeddings: untie (the head then keeps a float copy)
    method: bnb-nf4, bnb-fp4 the same targets become bitsandbytes' Linear4bit: a 4-bit NormalFloat / float
                             code per weight, one absmax per block of 64 weights (double_quant: those absmax
                             in 8 bits too), dequantized to compute_dtype for the matmul
    method: bnb-int8         the same targets become bitsandbytes' Linear8bitLt (LLM.int8): int8 weights, one
                             absmax per output row; input columns holding a value above int8_threshold run in
                             fp16 against the dequantized weights, the rest in int8
    method: mixed            each target gets one of `choices` (fp32, int8-dynamic, at most one bnb-*), the set
                             that raises calibration perplexity least (each layer and format measured alone)
                             while the targets fit in `budget` x their fp32 bytes (see quantize_mixed.py)
The bnb layers are those that transformers' load_in_4bit / load_in_8bit make: checkpoints hold transformers'
bnb format (see llmshrink/bnb.py), and loading them needs bitsandbytes.

llmshrink's own compressed layers (Kronecker, low-rank, ...) are left in their precision and listed in the record
(`kept`).
"""

from __future__ import annotations

import torch
from torch import nn

from llmshrink import bnb
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.int8_dynamic import Int8DynamicLinear, dense_weight
from llmshrink.modules.int8_embedding import Int8Embedding
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.quantize import QuantizeConfig
from llmshrink.quant_layers import (
    checked_embeddings,
    checked_targets,
    swap_embeddings,
    swap_layers,
    tensor_bytes,
)

CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def apply(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> PassRecord:
    if cfg.method == "mixed":
        from llmshrink.passes.quantize_mixed import mixed_quantize  # built on llmshrink/quant_layers.py too

        return mixed_quantize(model, cfg, ctx)
    if cfg.method in CASTS:
        return cast(model, CASTS[cfg.method], cfg.method)
    if cfg.method in bnb.METHODS:
        return bnb_quantize(model, cfg, ctx)
    return int8_dynamic(model, cfg, ctx)


def cast(model: nn.Module, dtype: torch.dtype, method: str) -> PassRecord:
    if any(isinstance(m, (Int8DynamicLinear, Int8Embedding)) for m in model.modules()):
        raise LlmshrinkError(f"quantize.method: {method} after int8-dynamic is not supported; cast first")
    if any(bnb.is_bnb_layer(m) for m in model.modules()):
        raise LlmshrinkError(f"quantize.method: {method} after bitsandbytes is not supported; cast first "
                             "(bnb-nf4 and bnb-fp4 take compute_dtype: bfloat16)")
    before = tensor_bytes(model)
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
            "bytes_after": tensor_bytes(model)}


def int8_dynamic(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> PassRecord:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        ctx.log("  quantize: no fbgemm on this machine: Int8DynamicLinear computes with dequantized weights")
    targets = checked_targets(model, cfg)
    tables = checked_embeddings(model, cfg) if cfg.embeddings else []  # every check before any change
    layers, untied = swap_layers(model, targets, Int8DynamicLinear.from_linear, lambda new: new.to_dense())
    embeddings, untied_tables = swap_embeddings(model, tables)
    from llmshrink.modules import COMPRESSED_MODULES

    others = tuple(cls for cls in COMPRESSED_MODULES.values() if cls not in (Int8DynamicLinear, Int8Embedding))
    kept = [name for name, m in model.named_modules() if others and isinstance(m, others)]
    record = {"method": cfg.method, **_summary(layers, kept, "int8 (per-channel)", ctx, embeddings)}
    if cfg.embeddings:
        record["embeddings"] = embeddings
    return {**record, "untied": untied + untied_tables}


def bnb_quantize(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> PassRecord:
    from llmshrink.modules import COMPRESSED_MODULES

    if any(bnb.is_bnb_layer(m) for m in model.modules()):
        # One quantization_config describes a checkpoint's bnb layers: a second bnb method could not be saved.
        raise LlmshrinkError(f"quantize.method: {cfg.method}: the model already has bitsandbytes layers; "
                             "quantize with bitsandbytes once")
    compressed = tuple(COMPRESSED_MODULES.values())
    # Compressed layers that are nn.Linear subclasses (pruned, fake-quant) stay as they are: transformers
    # would not rebuild them as bnb layers on load, so the checkpoint would not load without llmshrink.
    targets = checked_targets(model, cfg, skip=compressed)
    if not targets:
        raise LlmshrinkError(f"quantize.targets: {cfg.targets!r} matches only llmshrink's compressed layers, "
                             "which stay in their precision; nothing to quantize")
    spec = cfg.bnb_spec()
    bnb.check_runs(spec, dense_weight(targets[0][1]).device)
    # In the mode of the layer it replaces: bnb-int8 on CPU computes differently in training mode.
    layers, untied = swap_layers(
        model, targets, lambda m: bnb.quantize_layer(dense_weight(m), getattr(m, "bias", None), spec).train(m.training),
        bnb.dequantized_weight,
    )
    kept = [name for name, m in model.named_modules() if isinstance(m, compressed)]
    version = bnb.import_bnb(f"quantize.method: {cfg.method}").__version__
    return {"method": cfg.method, "bitsandbytes": {**spec.settings(), "version": version},
            **_summary(layers, kept, cfg.method, ctx), "untied": untied}


def _summary(layers: list[dict], kept: list[str], precision: str, ctx: Context,
             embeddings: list[dict] = ()) -> PassRecord:
    """Bytes before / after cover the layers and the embedding tables (int8-dynamic, embeddings: true)."""
    ctx.log(f"  quantize: {len(layers)} layers to {precision}, mean rel. weight error "
            f"{sum(layer['rel_error'] for layer in layers) / len(layers):.4f}"
            + (f"; {len(embeddings)} embeddings to int8 (per-row), max abs error "
               f"{max(table['max_abs_error'] for table in embeddings):.3g}" if embeddings else "")
            + (f"; {len(kept)} compressed layers kept in their precision" if kept else ""))
    swapped = [*layers, *embeddings]
    before, after = sum(lay["bytes_before"] for lay in swapped), sum(lay["bytes_after"] for lay in swapped)
    return {"layers": layers, "kept": kept, "bytes_before": before, "bytes_after": after,
            "ratio": round(after / before, 6)}
