"""bitsandbytes layers for the quantize pass (bnb-nf4, bnb-fp4, bnb-int8) and for checkpoints holding them.

A quantized layer is bitsandbytes' own Linear4bit / Linear8bitLt, built as transformers' load_in_4bit /
load_in_8bit builds it, so a checkpoint holds transformers' serialized bnb format and plain
`AutoModelForCausalLM.from_pretrained(dir)` loads it too:

    config.json  quantization_config = BitsAndBytesConfig(...).to_dict(), its llm_int8_skip_modules naming
                 every Linear/Conv1D left in float (transformers would quantize those on load otherwise)
    4-bit layer  NAME.weight (two 4-bit codes per uint8), NAME.weight.absmax, NAME.weight.quant_map,
                 [NAME.weight.nested_absmax, NAME.weight.nested_quant_map] (double quant),
                 NAME.weight.quant_state.bitsandbytes__nf4|fp4 (shape, blocksize, dtypes, packed as bytes)
    8-bit layer  NAME.weight (int8), NAME.SCB (fp32 absmax per output row), NAME.weight_format

`quantization_config` writes the config entry, `rebuild_layers` turns those tensors back into bnb layers
before load_checkpoint's strict load. bitsandbytes is imported only where a bnb layer is made or found.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from llmshrink.errors import LlmshrinkError, first_line
from llmshrink.targeting import is_bnb_layer, replace_module

FOUR_BIT = {"bnb-nf4": "nf4", "bnb-fp4": "fp4"}
METHODS = (*FOUR_BIT, "bnb-int8")
FALLBACK = ("fp16", "bf16", "int8-dynamic")  # the quantize methods that need no bitsandbytes
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BLOCKSIZE = 64  # weights per absmax in 4-bit: bitsandbytes' default, and transformers'
_QUANT_STATE = ".weight.quant_state.bitsandbytes__"


@dataclass(frozen=True)
class BnbSpec:
    """One bnb method and its settings, as the quantize pass's config gives them."""

    method: str
    double_quant: bool = True
    compute_dtype: str = "float32"
    threshold: float = 6.0

    def settings(self) -> dict[str, Any]:
        """The exact bitsandbytes layer arguments, for the pass record."""
        if self.method in FOUR_BIT:
            return {"layer": "Linear4bit", "quant_type": FOUR_BIT[self.method],
                    "double_quant": self.double_quant, "compute_dtype": self.compute_dtype,
                    "blocksize": BLOCKSIZE, "quant_storage": "uint8"}
        return {"layer": "Linear8bitLt", "threshold": self.threshold, "has_fp16_weights": False}


def import_bnb(where: str) -> Any:
    try:
        bitsandbytes = import_without_hub_kernel()
    except Exception as err:  # ImportError, or bitsandbytes' own error when its native library cannot load
        raise LlmshrinkError(f"{where} needs bitsandbytes, which cannot be imported ({first_line(err, with_type=False)[:200]}); "
                             f"use one of {', '.join(FALLBACK)}") from None
    return bitsandbytes


def import_without_hub_kernel() -> Any:
    """Import bitsandbytes without its import-time fetch of a CPU kernel from the Hugging Face hub.

    On AVX512-BF16 CPUs bitsandbytes 0.50 downloads (or, offline, fails to find) a kernel for its repacked
    bf16 path, which `_settle` turns off on every layer llmshrink makes or loads: hiding `kernels` during the
    import skips a network round trip (seconds) and a native download that would never run.
    """
    if "bitsandbytes" in sys.modules:  # imported already (by peft, transformers, the user): nothing to skip
        import bitsandbytes

        return bitsandbytes
    missing = "kernels" not in sys.modules
    saved = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]  # makes `from kernels import ...` fail
    try:
        import bitsandbytes
    finally:
        if missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved  # type: ignore[assignment]
    return bitsandbytes


def check_runs(spec: BnbSpec, device: torch.device) -> None:
    """Refuse in one line a method that this machine's bitsandbytes cannot run on `device`.

    Probed by running it on a small layer: what bitsandbytes supports depends on its version, its build
    and the CPU (CPU kernels came in 0.45-0.48), so trying is the only reliable check.
    """
    bnb = import_bnb(f"quantize.method: {spec.method}")
    reason = _probe(spec, device)
    if reason is not None:
        others = [m for m in METHODS if m != spec.method and _probe(replace(spec, method=m), device) is None]
        runs = [*FALLBACK, *others]
        raise LlmshrinkError(f"quantize.method: {spec.method} cannot run on {device.type} with bitsandbytes "
                             f"{bnb.__version__} ({reason}); runs here: {', '.join(runs)}")


def _probe(spec: BnbSpec, device: torch.device) -> str | None:
    """None if a 64x128 layer quantizes and runs a forward on `device`, else why not (one line)."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (seeded runs) untouched
    weight = torch.randn(64, 128, generator=generator)
    x = torch.randn(2, 128, generator=generator)
    x[0, 3] = 20.0  # an outlier column: bnb-int8's mixed-precision path runs too
    try:
        layer = quantize_layer(weight.to(device), None, spec).eval()
        with torch.no_grad():
            out = layer(x.to(device))
    except Exception as err:  # whatever the backend raises (no kernel, no device) means it cannot run here
        return first_line(err, with_type=False)[:200]
    return None if bool(torch.isfinite(out).all()) else "it computes NaN or inf"


def quantize_layer(weight: torch.Tensor, bias: torch.Tensor | None, spec: BnbSpec) -> nn.Module:
    """A Linear4bit / Linear8bitLt computing x @ weight.T + bias, quantized on weight's device.

    `weight` is (out, in) float (a GPT-2 Conv1D's transposed weight): the rounding is bitsandbytes' own, the
    same as transformers' load_in_4bit / load_in_8bit gives for these weights.
    """
    bnb = import_bnb(f"quantize.method: {spec.method}")
    out_features, in_features = weight.shape
    # bnb quantizes when a layer moves to a device, and Int8Params only when it moves from the CPU: so build
    # on the CPU (on "meta" first, to skip the random init) and move.
    data = weight.detach().to("cpu").contiguous()
    if spec.method in FOUR_BIT:
        quant_type, dtype = FOUR_BIT[spec.method], COMPUTE_DTYPES[spec.compute_dtype]
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                                  compress_statistics=spec.double_quant, quant_type=quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(data, requires_grad=False, blocksize=BLOCKSIZE,
                                         quant_type=quant_type, compress_statistics=spec.double_quant,
                                         module=layer)
        # Linear4bit's forward casts its bias to the compute dtype in place: do it now, so that what a
        # checkpoint stores does not depend on whether the model ran before it was saved.
        bias_dtype = dtype
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=spec.threshold, device="meta")
        layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
        bias_dtype = bias.dtype if bias is not None else None
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", bias_dtype), requires_grad=False)
    _settle(layer)
    return layer.to(weight.device)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) float32 weight a bnb layer computes with."""
    bnb = import_bnb("bitsandbytes layer")
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    # The first forward moves the int8 codes and scales from the weight to the layer's state.
    codes = layer.weight.CB if layer.weight.CB is not None else layer.state.CB
    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return codes.float() * (scales.float().unsqueeze(1) / 127)


def _settle(layer: nn.Module) -> None:
    """Make a bnb layer compute and save the same numbers on every machine (see the comments)."""
    # On CPUs with AVX512-BF16, Linear4bit's first eval forward repacks its weight for a faster kernel and
    # rounds the block scales to bf16; with double quant, saving quantizes them again: the checkpoint
    # would no longer hold what was measured. Keep the portable path (the one every other CPU runs).
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False
    if type(layer).__name__ == "Linear8bitLt":
        _log_cast_once()


def _log_cast_once() -> None:
    """bnb-int8 logs 'inputs will be cast ... to float16' at every forward of every layer: say it once."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


class _Once(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        new = message not in self.seen
        self.seen.add(message)
        return new


# --- checkpoints ----------------------------------------------------------------------------------


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """transformers' `quantization_config` for the model's bnb layers (None if it has none)."""
    layers = [(name, m) for name, m in model.named_modules() if is_bnb_layer(m)]
    if not layers:
        return None
    bnb = import_bnb("saving bitsandbytes layers")
    from transformers import BitsAndBytesConfig

    settings: dict[str, dict[str, Any]] = {}
    for name, layer in layers:
        if isinstance(layer, bnb.nn.Linear4bit):
            settings[name] = {
                "load_in_4bit": True, "bnb_4bit_quant_type": layer.weight.quant_type,
                "bnb_4bit_use_double_quant": bool(layer.weight.compress_statistics),
                "bnb_4bit_compute_dtype": _dtype_name(layer.compute_dtype or torch.float32),
                "bnb_4bit_quant_storage": _dtype_name(layer.weight.quant_storage),
            }
        elif isinstance(layer, bnb.nn.Linear8bitLt):
            settings[name] = {"load_in_8bit": True, "llm_int8_threshold": float(layer.state.threshold),
                              "llm_int8_has_fp16_weight": bool(layer.state.has_fp16_weights)}
        else:
            raise LlmshrinkError(f"cannot save {name}: {type(layer).__name__} is not a bitsandbytes layer "
                                 "llmshrink can save (Linear4bit, Linear8bitLt)")
    (first, wanted), *others = settings.items()
    for name, found in others:
        if found != wanted:
            raise LlmshrinkError(f"cannot save: {first} and {name} are bitsandbytes layers with different "
                                 f"settings ({wanted} vs {found}); one quantization_config holds one")
    # Every layer transformers' replace_with_bnb_linear would quantize on load, but that stays in float here.
    skip = [name for name, m in model.named_modules() if type(m) is nn.Linear or type(m).__name__ == "Conv1D"]
    config = BitsAndBytesConfig(**wanted, llm_int8_skip_modules=skip).to_dict()
    return json.loads(json.dumps(config))  # plain JSON types (quant_method is a str enum)


def rebuild_layers(model: nn.Module, config: dict[str, Any] | None, files: list[Path], config_file: Path,
                   device: torch.device) -> None:
    """Replace each layer whose saved tensors are bnb's by a bnb layer holding exactly those tensors.

    Built on `device`, where they will run: moving a quantized Linear8bitLt later (module.to) would leave its
    weight's CB and SCB on the old device.
    """
    where = f"{config_file}: quantization_config"
    found = _bnb_layer_tensors(files)
    if not found:
        if config:
            raise LlmshrinkError(f"{where} is set but the weights hold no bitsandbytes layer")
        return
    name, (kind, _) = next(iter(found.items()))
    if not isinstance(config, dict):
        raise LlmshrinkError(f"{files[0].parent}: {name} holds bitsandbytes {kind} tensors but config.json "
                             "has no quantization_config")
    if config.get("quant_method") != "bitsandbytes":
        raise LlmshrinkError(f"{where}.quant_method: {config.get('quant_method')!r} cannot be loaded by "
                             "llmshrink; allowed: bitsandbytes")
    bnb = import_bnb(f"{where}: loading")
    for name, (kind, saved) in found.items():
        if not config.get(f"load_in_{kind}"):
            raise LlmshrinkError(f"{where}: {name} holds {kind} tensors but load_in_{kind} is not set")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise LlmshrinkError(f"{where}: {name}: {type(model).__name__} has no such layer") from None
        tensors = {key: tensor.to(device) for key, tensor in saved.items()}
        if kind == "4bit":
            layer = _linear4bit(bnb, tensors, config, where)
        else:
            out_features, in_features = tensors["weight"].shape
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias="bias" in tensors,
                                        has_fp16_weights=bool(config.get("llm_int8_has_fp16_weight")),
                                        threshold=float(config.get("llm_int8_threshold", 6.0)), device="meta")
            # CB is what Int8Params.to() sets once quantized; SCB must exist before load_state_dict copies it.
            layer.weight = bnb.nn.Int8Params(tensors["weight"], requires_grad=False, has_fp16_weights=False,
                                             CB=tensors["weight"], SCB=tensors["SCB"])
        if "bias" in tensors:
            layer.bias = nn.Parameter(tensors["bias"], requires_grad=False)
        _settle(layer)
        replace_module(model, name, layer.train(model.get_submodule(name).training))


def _linear4bit(bnb: Any, tensors: dict[str, torch.Tensor], config: dict[str, Any], where: str) -> nn.Module:
    stats = {key.removeprefix("weight."): t for key, t in tensors.items() if key.startswith("weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(data=tensors["weight"], quantized_stats=stats,
                                                 requires_grad=False, device=tensors["weight"].device)
    compute = getattr(torch, str(config.get("bnb_4bit_compute_dtype", "float32")), None)
    if not isinstance(compute, torch.dtype):
        raise LlmshrinkError(f"{where}.bnb_4bit_compute_dtype: {config.get('bnb_4bit_compute_dtype')!r} "
                             "is not a torch dtype")
    out_features, in_features = weight.quant_state.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias="bias" in tensors, compute_dtype=compute,
                              compress_statistics=weight.compress_statistics, quant_type=weight.quant_type,
                              quant_storage=weight.quant_storage, device="meta")
    weight.module = layer
    layer.weight, layer.quant_state = weight, weight.quant_state
    return layer


def _bnb_layer_tensors(files: list[Path]) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """{layer name: ("4bit" | "8bit", {key without the name: tensor})} of the layers saved in bnb's format."""
    keys: dict[Path, list[str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys[file] = list(handle.keys())
        except Exception as err:  # safetensors raises its own error types for bad files
            raise LlmshrinkError(f"{file}: cannot read safetensors: {first_line(err, with_type=False)[:200]}") from None
    found: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for key in (key for file_keys in keys.values() for key in file_keys):
        if _QUANT_STATE in key:
            found[key.split(_QUANT_STATE)[0]] = ("4bit", {})
        elif key.endswith(".SCB"):
            found[key.removesuffix(".SCB")] = ("8bit", {})
    if not found:
        return found
    for file, file_keys in keys.items():
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in file_keys:
                # A Linear has no submodules: its tensors are the keys that start with its name.
                parts = key.split(".")
                name = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                             if ".".join(parts[:i]) in found), None)
                if name is not None:
                    found[name][1][key.removeprefix(f"{name}.")] = handle.get_tensor(key)
    return found


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
