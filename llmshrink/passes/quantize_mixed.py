"""quantize method `mixed`: each targeted layer gets one of several formats, chosen by measured sensitivity
under a size budget.

1. Bytes: what each target takes in the checkpoint (its state_dict) in each format of `choices`, measured
   on a converted layer (so bnb's absmax, quant maps and biases count); fp32 is the layer as it is.
2. Sensitivity: calibration perplexity with only that layer in that format, minus the perplexity with none
   (one forward over `calibration_tokens` per layer and format, the layer swapped in and back out).
3. Assignment, a multiple-choice knapsack solved greedily: every layer starts in its cheapest format; then
   the upgrade (a layer to a dearer format) that removes the most perplexity per added byte and still fits
   in budget x the targets' fp32 bytes is made, until none fits. Up to the first upgrade that does not fit,
   this is the greedy that solves the LP relaxation, so the total is at most the optimum plus that one
   upgrade's gain; bytes stay exact (a DP would bucket them). A measured increase below zero is calibration
   noise (rounding does not make a model better) and counts as 0, so bytes left over go to such upgrades,
   the biggest first: budget 1.0 with fp32 among the choices keeps every layer fp32.
4. Conversion, by the same builders as the single-format methods.

Formats: fp32, int8-dynamic and at most one bitsandbytes method, because a checkpoint's quantization_config
describes one bnb setting; bnb layers, Int8DynamicLinear and float layers then reload exactly side by side.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmshrink import bnb
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.perplexity import max_positions, perplexity
from llmshrink.modules.int8_dynamic import Int8DynamicLinear, dense_weight
from llmshrink.passes.base import PassRecord
from llmshrink.quant_layers import checked_targets, swap_layers, tensor_bytes
from llmshrink.sensitivity import layer_sensitivity
from llmshrink.targeting import check_tied, find_targets, require_causal_lm

if TYPE_CHECKING:
    from llmshrink.passes.configs.quantize import QuantizeConfig

WINDOW = 512  # calibration window (shorter if the text or the model's positions are)

# (build the quantized layer from a float one, its dequantized (out, in) weight) per format
Builder = tuple[Callable[[nn.Module], nn.Module], Callable[[nn.Module], torch.Tensor]]


def mixed_quantize(model: nn.Module, cfg: QuantizeConfig, ctx: Context) -> PassRecord:
    from llmshrink.modules import COMPRESSED_MODULES

    require_causal_lm(model, "quantize.method: mixed ranks layers by calibration perplexity",
                      "use int8-dynamic or a bnb-* method")
    bnb_format = next((fmt for fmt in cfg.choices if fmt in bnb.METHODS), None)
    if bnb_format and any(bnb.is_bnb_layer(m) for m in model.modules()):
        raise LlmshrinkError(f"quantize.choices: {bnb_format}: the model already has bitsandbytes layers; "
                             "quantize with bitsandbytes once")
    _refuse_tied(model, cfg)
    compressed = tuple(COMPRESSED_MODULES.values())
    # As bnb-*: llmshrink's compressed layers keep their precision (a bnb layer could not replace them).
    targets = checked_targets(model, cfg, skip=compressed)
    if not targets:
        raise LlmshrinkError(f"quantize.targets: {cfg.targets!r} matches only llmshrink's compressed layers, "
                             "which stay in their precision; nothing to quantize")
    spec = bnb.BnbSpec(bnb_format, cfg.double_quant, cfg.compute_dtype, cfg.int8_threshold) if bnb_format else None
    if spec is not None:
        _check_bnb_runs(spec, dense_weight(targets[0][1]).device)
    builders = {fmt: _builder(fmt, spec) for fmt in cfg.choices if fmt != "fp32"}
    sizes = _sizes(targets, builders)
    total, limit = _limit(sizes, cfg)  # refuses an impossible budget before the long measurement

    ids = ctx.train_token_ids()[: cfg.calibration_tokens]
    window = min(WINDOW, len(ids), max_positions(model) or WINDOW)
    ctx.log(f"  quantize mixed: measuring {len(targets)} layers x {len(builders)} formats on {len(ids)} "
            f"calibration tokens")
    base, deltas = _measure(model, targets, builders, ids, window)
    chosen = assign(sizes, deltas, list(cfg.choices), limit)
    layers, untied = _convert(model, targets, chosen, builders)

    for layer, choice, size, delta in zip(layers, chosen, sizes, deltas, strict=True):
        layer.update(format=choice, delta_ppl={fmt: round(delta[fmt], 6) for fmt in cfg.choices},
                     bytes={fmt: size[fmt] for fmt in cfg.choices})
    after = sum(layer["bytes_after"] for layer in layers)
    counts = Counter(chosen)
    predicted = sum(max(delta[choice], 0.0) for delta, choice in zip(deltas, chosen, strict=True))
    ctx.log(f"  quantize mixed: {', '.join(f'{counts[fmt]} {fmt}' for fmt in cfg.choices)}; "
            f"{after / total:.4f} of the fp32 bytes (budget {cfg.budget}); calibration ppl {base:.3f}, "
            f"+{predicted:.4f} predicted (the chosen formats' increases, measured one layer at a time)")
    record: PassRecord = {
        "method": "mixed", "choices": list(cfg.choices), "budget": cfg.budget,
        "calibration": {"tokens": int(len(ids)), "window": window, "stride": window, "bos": False,
                        "base_ppl": round(base, 6), "delta_ppl": "ppl with only this layer in this format - base"},
        "assignment": "greedy multiple-choice knapsack: most ppl removed per added byte first; increases < 0 "
                      "count as 0",
        "predicted_ppl_increase": round(predicted, 6), "formats": {fmt: counts[fmt] for fmt in cfg.choices},
        "layers": layers, "kept": [name for name, m in model.named_modules() if isinstance(m, compressed)],
        "untied": untied, "bytes_before": total, "bytes_budget": limit, "bytes_after": after,
        "ratio": round(after / total, 6),
    }
    if spec is not None:
        version = bnb.import_bnb(f"quantize.choices: {spec.method}").__version__
        record["bitsandbytes"] = {**spec.settings(), "version": version}
    return record


def _limit(sizes: list[dict[str, int]], cfg: QuantizeConfig) -> tuple[int, int]:
    """(the targets' fp32 bytes, the budget in whole bytes), or a refusal if not even the cheapest formats fit."""
    total = sum(size["fp32"] for size in sizes)
    limit = int(cfg.budget * total)  # rounded down: never above the budget
    cheapest = sum(min(size[fmt] for fmt in cfg.choices) for size in sizes)
    if cheapest > limit:
        lowest = -(-cheapest * 10_000 // total) / 10_000  # rounded up: a budget that does fit
        raise LlmshrinkError(
            f"quantize.budget: {cfg.budget} is below what the choices allow: every layer in its cheapest "
            f"format takes {cheapest:,} of the targets' {total:,} fp32 bytes; allowed: {lowest} to 1"
        )
    return total, limit


def _measure(model: nn.Module, targets: list[tuple[str, nn.Module]], builders: dict[str, Builder],
             ids: torch.Tensor, window: int) -> tuple[float, list[dict[str, float]]]:
    """(calibration perplexity, [{format: its increase with only this layer in that format}] per target)."""
    device = next(model.parameters()).device
    base = perplexity(model, ids, window, window, device=device, progress=False).ppl
    groups = {index: [target] for index, target in enumerate(targets)}
    deltas = [{"fp32": 0.0} for _ in targets]
    for fmt, (build, _) in builders.items():
        scores = layer_sensitivity(model, groups, lambda _name, module, build=build: build(module), ids, window,
                                   desc=f"sensitivity {fmt}", unit="layer")
        for index, ppl in scores.items():
            deltas[index][fmt] = ppl - base
    return base, deltas


def _convert(model: nn.Module, targets: list[tuple[str, nn.Module]], chosen: list[str],
             builders: dict[str, Builder]) -> tuple[list[dict], list[str]]:
    """Put each target in its format; (a record per target, in target order; the tied heads untied)."""
    converted, untied = {}, []
    for fmt, (build, dequantize) in builders.items():
        members = [target for target, choice in zip(targets, chosen, strict=True) if choice == fmt]
        layers, untied_here = swap_layers(model, members, build, dequantize)
        converted.update((layer["name"], layer) for layer in layers)
        untied += untied_here
    fp32 = {name: {"name": name, "shape": list(dense_weight(module).shape), "rel_error": 0.0,
                   "bytes_before": tensor_bytes(module), "bytes_after": tensor_bytes(module)}
            for name, module in targets if name not in converted}
    return [converted.get(name) or fp32[name] for name, _ in targets], untied


def assign(sizes: list[dict[str, int]], deltas: list[dict[str, float]], choices: list[str], limit: int) -> list[str]:
    """A format per layer: least total (clamped) perplexity increase with the bytes at most `limit`.

    sizes[i][fmt]: bytes of layer i in fmt; deltas[i][fmt]: its measured perplexity increase.
    """
    def cost(i: int, fmt: str) -> float:
        return max(deltas[i][fmt], 0.0)

    # Cheapest first; of equal bytes, the least harmful.
    chosen = [min(choices, key=lambda fmt, i=i: (sizes[i][fmt], cost(i, fmt))) for i in range(len(sizes))]
    spent = sum(size[fmt] for size, fmt in zip(sizes, chosen, strict=True))
    while True:
        best = None  # (gain per byte, added bytes, -layer) of the best upgrade that fits, and the upgrade
        for i, current in enumerate(chosen):
            for fmt in choices:
                extra = sizes[i][fmt] - sizes[i][current]
                gain = cost(i, current) - cost(i, fmt)
                if extra <= 0 or gain < 0 or spent + extra > limit:
                    continue
                # Most gain per byte; then (for gains of 0) the biggest upgrade; then the first layer.
                key = (gain / extra, extra, -i)
                if best is None or key > best[0]:
                    best = (key, i, fmt)
        if best is None:
            return chosen
        _, i, fmt = best
        spent += sizes[i][fmt] - sizes[i][chosen[i]]
        chosen[i] = fmt


def _builder(fmt: str, spec: bnb.BnbSpec | None) -> Builder:
    if fmt == "int8-dynamic":
        return Int8DynamicLinear.from_linear, lambda layer: layer.to_dense()
    # In the mode of the layer it replaces: bnb-int8 on CPU computes differently in training mode.
    return (lambda m: bnb.quantize_layer(dense_weight(m), getattr(m, "bias", None), spec).train(m.training),
            bnb.dequantized_weight)


def _sizes(targets: list[tuple[str, nn.Module]], builders: dict[str, Builder]) -> list[dict[str, int]]:
    """Checkpoint bytes of each target in each format, from a converted copy of each layer: not from its shape
    alone, as a 4-bit layer's packed quant state (JSON text) varies by a byte or two with its values."""
    return [{"fp32": tensor_bytes(module), **{fmt: tensor_bytes(build(module)) for fmt, (build, _) in builders.items()}}
            for _, module in targets]


def _refuse_tied(model: nn.Module, cfg: QuantizeConfig) -> None:
    # Before checked_targets, whose message would name one precision: here the format is not chosen yet.
    targets = find_targets(model, cfg.targets, cfg.exclude, cfg.layers, field="quantize.targets")
    check_tied(model, targets, cfg.tied_embeddings, "quantize", "let it take a quantized format", note=None)


def _check_bnb_runs(spec: bnb.BnbSpec, device: torch.device) -> None:
    try:
        bnb.check_runs(spec, device)
    except LlmshrinkError as err:  # its message names quantize.method; here the format comes from choices
        raise LlmshrinkError(str(err).replace("quantize.method: ", "quantize.choices: ", 1)) from None
