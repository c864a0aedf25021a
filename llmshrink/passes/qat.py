"""qat pass: quantization-aware training, the first half. Targeted Linear/Conv1D layers become FakeQuantLinear,
which computes with its weight rounded per output channel to the int8 layer's grid (-63..63; and, with
`activations: true`, its input rounded per token to 8 bits as the int8 kernel will), so that a following
`distill` stage trains the model against its quantization error. A later `quantize: {method: int8-dynamic}`
stage converts them to real int8 layers: it rounds exactly as the training did, so the converted weights are
the ones trained on the grid. A recipe:

    - qat: {}
    - distill: {steps: 100}
    - quantize: {method: int8-dynamic}
"""

from __future__ import annotations

from torch import nn
from tqdm.auto import tqdm

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.fake_quant import FakeQuantLinear, dense_weight
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.qat import QatConfig
from llmshrink.targeting import find_targets, replace_module, shared_weight_names


def apply(model: nn.Module, cfg: QatConfig, ctx: Context) -> PassRecord:
    targets = [(name, m) for name, m in find_targets(model, cfg.targets, cfg.exclude, cfg.layers, field="qat.targets")
               if not isinstance(m, FakeQuantLinear)]
    if not targets:
        raise LlmshrinkError(f"qat.targets: every layer matching {cfg.targets!r} is already fake-quantized")
    for name, _ in targets:
        tied_to = shared_weight_names(model, name)
        if tied_to:
            raise LlmshrinkError(f"qat.targets: {name} shares its weight with {', '.join(tied_to)} "
                                 "(tied embeddings); exclude it (the default targets do)")
    layers = []
    for name, module in tqdm(targets, desc="qat", unit="layer", leave=False):
        new = FakeQuantLinear.from_linear(module, activations=cfg.activations)
        weight = dense_weight(module).float()
        error = float((new.to_dense().float() - weight).norm() / weight.norm().clamp(min=1e-30))
        replace_module(model, name, new)
        layers.append({"name": name, "shape": list(weight.shape), "rel_error": round(error, 6)})
    ctx.log(f"  qat: {len(layers)} layers train through int8 rounding"
            + (" of weights and inputs" if cfg.activations else " of their weights"))
    return {"layers": layers, "activations": cfg.activations}
