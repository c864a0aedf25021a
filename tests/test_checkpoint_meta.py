"""load_checkpoint builds the model empty (meta) and takes the file's tensors: no dense base, no copy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

import llmshrink.checkpoint_load as ckpt_load
from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.errors import LlmshrinkError
from llmshrink.lazy_load import check_materialised
from llmshrink.modules import KroneckerLinear

HIDDEN, WIDE = 64, 8192  # the MLPs' dense weights would be 3 x 2 MiB per block


def wide_kronecker_llama() -> LlamaForCausalLM:
    """A Llama whose config says intermediate_size=WIDE, with every MLP projection Kronecker-factored."""
    model = tiny_llama(hidden_size=HIDDEN, intermediate_size=8, pad_token_id=None)
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.gate_proj = KroneckerLinear(HIDDEN, WIDE, (64, 8), (128, 8), bias=False)
        mlp.up_proj = KroneckerLinear(HIDDEN, WIDE, (64, 8), (128, 8), bias=False)
        mlp.down_proj = KroneckerLinear(WIDE, HIDDEN, (8, 64), (8, 128), bias=False)
    model.config.intermediate_size = WIDE  # what load_checkpoint builds the base from
    return model.eval()


class _Allocations(TorchDispatchMode):
    """Records the shape of every tensor an op creates off the meta device."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not out.is_meta:
            self.shapes.append(tuple(out.shape))
        return out


def test_dense_layers_replaced_by_compressed_ones_are_never_allocated(tmp_path):
    model = wide_kronecker_llama()
    out = save_tiny(model, tmp_path / "wide")
    with _Allocations() as seen:
        loaded = load_checkpoint(out)
    dense = {(WIDE, HIDDEN), (HIDDEN, WIDE)}
    assert not dense & set(seen.shapes)  # the code before this change allocated 6 (torch.empty)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_bert], ids=["gpt2", "llama", "bert"])
def test_buffers_not_in_the_file_are_computed_as_the_constructor_does(tmp_path, build):
    # rotary inv_freq, BERT's position_ids and token_type_ids, GPT-2's masks: non-persistent, not saved
    model = build()
    out = save_tiny(model, tmp_path / "m")
    loaded = load_checkpoint(out)
    buffers = dict(model.named_buffers())
    assert buffers.keys() == dict(loaded.named_buffers()).keys()
    for name, buffer in loaded.named_buffers():
        assert buffer.device.type == "cpu" and torch.equal(buffer, buffers[name]), name
    for name, param in loaded.named_parameters():
        assert param.device.type == "cpu" and torch.equal(param, dict(model.named_parameters())[name]), name
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tensor_left_on_meta_is_one_line(tmp_path, monkeypatch):
    out = save_tiny(tiny_llama(), tmp_path / "m")
    weights = load_file(out / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlmshrinkError, match="missing from the weights: model.norm.weight"):
        load_checkpoint(out)
    monkeypatch.setattr(ckpt_load, "check_aliases", lambda *args: None)  # the last line of defence alone
    with pytest.raises(LlmshrinkError) as info:
        load_checkpoint(out)
    assert "\n" not in str(info.value)
    assert str(info.value).endswith("1 tensor(s) left unloaded (still on the meta device): model.norm.weight")
    with pytest.raises(LlmshrinkError, match="2 tensor"):
        check_materialised(nn.Linear(2, 3, device="meta"), "x")


PROBE = r"""
import json, resource, sys
import psutil, torch
from transformers.models.llama import modeling_llama  # noqa: F401  (its import is not the load)
from llmshrink.checkpoint_load import load_checkpoint
before = psutil.Process().memory_info().rss
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load_checkpoint(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))
print(json.dumps({"growth": peak - max(before, peak_before), "after_use": psutil.Process().memory_info().rss - before}))
"""


def test_loading_maps_the_weights_instead_of_copying_them(tmp_path):
    # 64 MiB of fp32 weights (mostly the tied embedding). They are paged in from the file when first used;
    # the NaN check reads the file in 4 MiB chunks. Measured growth: 13-21 MiB; 186 MiB before this change
    # (a copy of every weight, plus the mapped file and torch.isfinite's temporaries for the largest one).
    out = save_tiny(tiny_llama(layers=1, hidden_size=512, intermediate_size=64, vocab_size=32768, pad_token_id=None),
                    tmp_path / "m")
    weights = (out / "model.safetensors").stat().st_size
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert weights > 60 * 2**20
    assert result["growth"] < weights / 2, result


def test_weights_changed_after_loading_never_reach_the_file(tmp_path):
    # The loaded tensors map the file copy-on-write: training in place changes the model only.
    out = save_tiny(tiny_llama(), tmp_path / "m")
    saved = (out / "model.safetensors").read_bytes()
    model = load_checkpoint(out)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert (out / "model.safetensors").read_bytes() == saved
    again = load_checkpoint(out)
    assert torch.equal(model.model.norm.weight, again.model.norm.weight + 1.0)
