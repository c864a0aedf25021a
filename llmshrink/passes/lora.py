"""LoRA pass: attach peft LoRA adapters to the (possibly compressed) model, for a later distill stage to train.

    y = base(x) + (alpha / r) · B A dropout(x)        A: (r, in), B: (out, r), B = 0 at init

The adapters are injected in place (peft.inject_adapter_in_model), so the model the engine holds stays the
transformers model: a later `distill` (train: all) trains exactly the adapters, the only parameters left
with requires_grad. llmshrink's LowRankLinear and KroneckerLinear get a LoRA layer of their own through
peft's custom-module mapping (`LoraConfig._register_custom_module`, experimental in peft 0.21).

At the end of the recipe the adapters must leave the model before it is saved; the engine does it through this
module's lifecycle hooks (passes/base.py): merge: true folds them into the weights after the last stage
(`finalize` -> `merge_lora`; a rank-k LowRankLinear becomes rank k + r, exactly: [U, sB] [V; A]); merge: false
writes them beside the checkpoint, in <output>/adapter/ in peft's format (`save_extra` -> `save_adapter`; reload
with `load_adapter` or, for Linear/Conv1D targets, plain `PeftModel.from_pretrained`) and takes them out
(`unload_extra` -> `unload_lora`).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llmshrink.bnb import import_without_hub_kernel

# peft imports bitsandbytes (when installed): import it first through bnb.py, which skips its hub kernel
# fetch (see import_without_hub_kernel). Without a working bitsandbytes, peft does not need it.
with contextlib.suppress(Exception):
    import_without_hub_kernel()

from peft import LoraConfig, PeftModel, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from safetensors.torch import save_file
from torch import nn

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.kronecker import KroneckerLinear
from llmshrink.modules.low_rank import LowRankLinear
from llmshrink.passes.base import Extra, PassRecord
from llmshrink.passes.configs.lora import _ALLOWED, LoraPassConfig
from llmshrink.targeting import is_bnb_layer, is_dense_layer, layer_index, replace_module, shared_weight_names

ADAPTER = "default"  # peft's adapter name; one adapter per model
ADAPTER_DIR = "adapter"  # unmerged adapters, in peft's format, inside the output folder
# On the model: {"merge": bool, "trainable": names that had requires_grad before the adapters froze them}.
_STATE = "llmshrink_lora"


class CompressedLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear over a compressed layer: the base runs as it is, B·A·x is added to its output.

    Any module with in_features / out_features that computes x Wᵀ + b works for training and saving;
    merging is exact only for LowRankLinear (the factors grow by r), so only that one merges.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False  # the base applies x Wᵀ, whatever the config says for the Conv1D targets

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # peft looks for `.weight`, which compressed layers lack; without this the adapter stays on the CPU.
        like = next(p for p in base_layer.parameters() if p.is_floating_point())
        return like.device, like.dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        if not isinstance(base, LowRankLinear):
            raise ValueError(f"a LoRA update cannot be merged exactly into a {type(base).__name__}")
        for name in check_adapters_to_merge(self, adapter_names):
            a = self.lora_A[name].weight.detach()
            b = self.lora_B[name].weight.detach() * self.scaling[name]
            _set_factors(base, torch.cat([base.u.detach(), b.to(base.u.dtype)], 1),
                         torch.cat([base.v.detach(), a.to(base.v.dtype)], 0))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:  # merges appended their factors last: drop them in reverse order
            r = self.r[self.merged_adapters.pop()]
            _set_factors(base, base.u.detach()[:, :-r], base.v.detach()[:-r])


CUSTOM_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    LowRankLinear: CompressedLoraLinear,
    KroneckerLinear: CompressedLoraLinear,
}


def apply(model: nn.Module, cfg: LoraPassConfig, ctx: Context) -> PassRecord:
    if has_lora(model):
        raise LlmshrinkError("lora: the model already has LoRA adapters; use one lora stage per recipe")
    targets = _find_targets(model, cfg)
    if cfg.merge:
        _check_mergeable(model, targets, cfg.r)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # GPT-2's Conv1D stores W transposed; peft checks this flag against each Linear/Conv1D it wraps.
    conv1d = any(type(module).__name__ == "Conv1D" for _, module in targets)
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=[name for name, _ in targets],  # exact names: the saved config says what was adapted
        fan_in_fan_out=conv1d,
    )
    config._register_custom_module(CUSTOM_LAYERS)
    with _bnb_flags(model):
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # also freezes every non-adapter parameter
    setattr(model, _STATE, {"merge": cfg.merge, "trainable": trainable})
    layers = [
        {"name": name, "type": type(module).__name__, "shape": [out, inp], "params": cfg.r * (inp + out)}
        for name, module in targets
        for out, inp in [_shape(module)]
    ]
    adapter_params = sum(layer["params"] for layer in layers)
    ctx.log(f"  lora: rank {cfg.r} adapters on {len(layers)} layers, {adapter_params:,} params (the only "
            f"trainable ones); {'merged' if cfg.merge else 'saved in peft format'} at the end")
    return {
        "r": cfg.r, "alpha": cfg.alpha, "scaling": cfg.alpha / cfg.r, "dropout": cfg.dropout, "merge": cfg.merge,
        "fan_in_fan_out": conv1d, "layers": layers, "adapter_params": adapter_params,
    }


# --- lifecycle hooks: what the engine calls at the end of the recipe (passes/base.py) -----------------------


def finalize(model: nn.Module, ctx: Context) -> str | None:
    """merge: true: fold the adapters into the weights, after every stage (so a later distill trained them first)."""
    settings = lora_settings(model)
    if settings is None or not settings["merge"]:
        return None
    return f"lora: merged {merge_lora(model)} adapters into the weights"


def save_extra(model: nn.Module, directory: Path) -> Extra | None:
    """merge: false: the adapters in peft's format (PeftModel.from_pretrained loads them); the base weights are
    saved without them."""
    if lora_settings(model) is None:
        return None
    save_adapter(model, directory)
    # peft's reload sums the adapter in a different order: equal to float tolerance
    return Extra(ADAPTER_DIR, {"dir": ADAPTER_DIR, "merged": False}, atol=1e-4)


def unload_extra(model: nn.Module) -> None:
    unload_lora(model)


def load_extra(model: nn.Module, directory: Path) -> PeftModel:
    return load_adapter(model, directory)


# --- adapters in and out ----------------------------------------------------------------------------------


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def lora_settings(model: nn.Module) -> dict | None:
    """{"merge": bool} of the lora stage that adapted `model`, or None when it has no adapters."""
    state = model.__dict__.get(_STATE)
    return {"merge": state["merge"]} if state is not None and has_lora(model) else None


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer's weights and remove the LoRA layers; returns how many."""
    return _remove_adapters(model, merge=True)


def unload_lora(model: nn.Module) -> int:
    """Remove every LoRA layer without merging (after save_adapter); returns how many."""
    return _remove_adapters(model, merge=False)


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter as PeftModel.save_pretrained does: adapter_config.json + adapter_model.safetensors."""
    if not has_lora(model):
        raise LlmshrinkError("save_adapter: the model has no LoRA adapters")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.copy(model.peft_config[ADAPTER])
    config.inference_mode = True  # as peft saves it: a loaded adapter is frozen unless asked otherwise
    config.save_pretrained(str(directory))
    # PeftModel's keys carry its own wrapping (base_model.model.<name>); from_pretrained expects them.
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    tensors = {f"base_model.model.{key}": value.detach().contiguous().cpu() for key, value in state.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> PeftModel:
    """PeftModel.from_pretrained with llmshrink's compressed layers registered (peft does not save the mapping)."""
    config = LoraConfig.from_pretrained(str(directory))
    config._register_custom_module(CUSTOM_LAYERS)
    with _bnb_flags(model):
        return PeftModel.from_pretrained(model, str(directory), config=config)


# --- helpers -----------------------------------------------------------------------------------------------


def _is_layer(module: nn.Module) -> bool:
    """A linear map LoRA could sit on: dense, or any compressed layer with in/out features."""
    return is_dense_layer(module) or (hasattr(module, "in_features") and hasattr(module, "out_features"))


def _shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) features; Conv1D stores its weight as (in, out)."""
    if type(module).__name__ == "Conv1D":
        inp, out = module.weight.shape
        return out, inp
    return module.out_features, module.in_features


def _find_targets(model: nn.Module, cfg: LoraPassConfig) -> list[tuple[str, nn.Module]]:
    pattern, chosen = cfg.pattern(), []
    for name, module in model.named_modules():
        if not _is_layer(module) or not re.fullmatch(pattern, name):
            continue
        if cfg.exclude and re.fullmatch(cfg.exclude, name):
            continue
        if cfg.layers is not None and layer_index(name) not in cfg.layers:
            continue
        if not (is_dense_layer(module) or is_bnb_layer(module) or type(module) in CUSTOM_LAYERS):
            raise LlmshrinkError(
                f"lora.targets: {name} is a {type(module).__name__}; LoRA attaches only to {_ALLOWED} layers: "
                "leave it out of targets or add it to exclude"
            )
        chosen.append((name, module))
    if not chosen:
        examples = [n for n, m in model.named_modules() if _is_layer(m)][:4]
        raise LlmshrinkError(
            f"lora.targets: {pattern!r} matches no layer LoRA can attach to ({_ALLOWED})"
            + (f" in layers {cfg.layers}" if cfg.layers is not None else "") + "; "
            f"layer names look like {', '.join(examples)}"
        )
    return chosen


def _check_mergeable(model: nn.Module, targets: list[tuple[str, nn.Module]], r: int) -> None:
    """Refuse, before any work, a merge that could not be exact or would change another module."""
    for name, module in targets:
        if is_bnb_layer(module):
            raise LlmshrinkError(
                f"lora.merge: {name} is a bitsandbytes {type(module).__name__}: merging re-quantizes the weights, "
                "so the merged model would not compute what was trained; use merge: false (QLoRA keeps the "
                "adapter beside the quantized model)"
            )
        if isinstance(module, KroneckerLinear):
            raise LlmshrinkError(
                f"lora.merge: {name} is a KroneckerLinear, whose factors cannot absorb a LoRA update exactly; "
                "use merge: false (the adapter is saved beside the model) or exclude it"
            )
        if isinstance(module, LowRankLinear) and module.rank + r > min(module.in_features, module.out_features):
            raise LlmshrinkError(
                f"lora.merge: {name}: LowRankLinear rank {module.rank} + r {r} exceeds "
                f"min({module.out_features}, {module.in_features}); lower r or use merge: false"
            )
        tied = shared_weight_names(model, name) if getattr(module, "weight", None) is not None else []
        if tied:
            raise LlmshrinkError(
                f"lora.merge: {name} shares its weight with {', '.join(tied)} (tied embeddings), which a merge "
                "would change too; exclude it or use merge: false"
            )


def _remove_adapters(model: nn.Module, merge: bool) -> int:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if merge:  # all or nothing: check every layer before the first one changes
        for name, layer in layers:
            if isinstance(layer, CompressedLoraLinear) and not isinstance(layer.get_base_layer(), LowRankLinear):
                raise LlmshrinkError(
                    f"merge_lora: {name} is a {type(layer.get_base_layer()).__name__}, whose weights cannot absorb "
                    "a LoRA update exactly; save the adapter instead (save_adapter, then unload_lora)"
                )
    for name, layer in layers:
        if merge:
            layer.merge()
        replace_module(model, name, layer.get_base_layer())
    state = model.__dict__.pop(_STATE, None)
    if state is not None:  # peft froze the base; give back the flags it had (a later distill may train it)
        trainable = set(state["trainable"])
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return len(layers)


@contextmanager
def _bnb_flags(model: nn.Module) -> Iterator[None]:
    """peft wraps a bitsandbytes layer with its QLoRA layer only when the model says it is loaded in 4/8 bit
    (as transformers' load_in_4bit marks it); llmshrink's quantize pass makes such layers in place."""
    flags = {"is_loaded_in_4bit": "Linear4bit", "is_loaded_in_8bit": "Linear8bitLt"}
    kinds = {type(m).__name__ for m in model.modules() if is_bnb_layer(m)}
    added = [flag for flag, kind in flags.items() if kind in kinds and not getattr(model, flag, False)]
    for flag in added:
        setattr(model, flag, True)
    try:
        yield
    finally:
        for flag in added:
            delattr(model, flag)


def _set_factors(layer: LowRankLinear, u: torch.Tensor, v: torch.Tensor) -> None:
    """Replace a LowRankLinear's factors (and so its rank), keeping their trainable flags."""
    layer.u = nn.Parameter(u.contiguous(), requires_grad=layer.u.requires_grad)
    layer.v = nn.Parameter(v.contiguous(), requires_grad=layer.v.requires_grad)
    layer.rank = u.shape[1]
