"""Private or experimental APIs of other libraries that llmshrink relies on: fail loudly when they change.

- accelerate: `AcceleratorState._shared_state` / `_reset_state` (distill/trainer.py `_accelerator`: each
  train() call starts accelerate's process-wide state over when the mixed precision changes, which
  accelerate otherwise refuses; tests/test_distill_multiprocess.py also resets it in forked workers).
- peft: `LoraConfig._register_custom_module` (passes/lora.py: LoRA layers for LowRankLinear and
  KroneckerLinear; experimental in peft 0.21).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def test_accelerate_shared_state_and_reset_state():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    assert isinstance(AcceleratorState.__dict__.get("_shared_state"), dict), (
        "accelerate changed AcceleratorState._shared_state: fix llmshrink/distill/trainer.py _accelerator"
    )
    assert isinstance(AcceleratorState.__dict__.get("_reset_state"), staticmethod), (
        "accelerate changed AcceleratorState._reset_state: fix llmshrink/distill/trainer.py _accelerator"
    )
    assert "reset_partial_state" in inspect.signature(AcceleratorState._reset_state).parameters
    for cls in (PartialState, GradientState):
        assert callable(getattr(cls, "_reset_state", None)), f"accelerate removed {cls.__name__}._reset_state"

    # What _accelerator reads: the precision of the live state, under "_mixed_precision".
    AcceleratorState._reset_state()
    try:
        Accelerator(cpu=True, mixed_precision="bf16")
        assert AcceleratorState._shared_state.get("_mixed_precision") == "bf16"
        AcceleratorState._reset_state()
        assert "_mixed_precision" not in AcceleratorState._shared_state
        # Another precision in the same process once the state is reset (refused without the reset).
        assert Accelerator(cpu=True, mixed_precision="no").mixed_precision == "no"
    finally:
        AcceleratorState._reset_state()


def test_peft_register_custom_module():
    from peft import inject_adapter_in_model

    from llmshrink.modules.low_rank import LowRankLinear
    from llmshrink.passes.lora import ADAPTER, CUSTOM_LAYERS, CompressedLoraLinear, LoraConfig

    assert callable(getattr(LoraConfig, "_register_custom_module", None)), (
        "peft removed LoraConfig._register_custom_module: fix llmshrink/passes/lora.py"
    )
    assert list(inspect.signature(LoraConfig._register_custom_module).parameters) == ["self", "mapping"]

    config = LoraConfig(r=2, target_modules=["proj"])
    config._register_custom_module(CUSTOM_LAYERS)
    assert config._custom_modules == CUSTOM_LAYERS  # peft reads the mapping from here
    model = nn.Sequential()
    model.add_module("proj", LowRankLinear(8, 6, rank=3))
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    assert isinstance(model.proj, CompressedLoraLinear), type(model.proj)
    assert model(torch.randn(2, 8)).shape == (2, 6)
