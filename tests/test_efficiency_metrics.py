"""Efficiency metrics: MACs per token against hand formulas, peak RAM in a subprocess, latency at batch > 1,
and the report rows they print as."""

from __future__ import annotations

import tempfile
import time

import pytest
import safetensors.torch
import torch
from conftest import save_tiny, tiny_gpt2, tiny_llama
from torch import nn

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.latency import measure_latency
from llmshrink.eval.macs import count_macs, macs_per_decode_token, macs_per_token
from llmshrink.eval.memory import measure_memory, peak_rss_mb
from llmshrink.eval.report import comparison_rows
from llmshrink.eval.size import count_params, safetensors_bytes
from llmshrink.modules.int8_dynamic import Int8DynamicLinear
from llmshrink.modules.kronecker import KroneckerLinear
from llmshrink.modules.low_rank import LowRankLinear
from llmshrink.modules.shared_block import SharedBlockRef
from llmshrink.modules.tensorized import TensorizedLinear

T, IN, OUT = 7, 48, 24


def _x(rows: int = T, features: int = IN) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(0))


def test_linear_macs_are_rows_times_in_times_out():
    out = count_macs(nn.Linear(IN, OUT), _x())
    assert out["total"] == out["linear"] == T * IN * OUT
    assert out["attention"] == 0 and out["complete"]


def test_low_rank_macs_match_formula():
    rank = 5
    out = count_macs(LowRankLinear(IN, OUT, rank), _x())
    assert out["total"] == T * rank * (IN + OUT)
    assert out["total"] < T * IN * OUT


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "rank", "input_side_first"),
    [((4, 6), (6, 8), 2, False), ((12, 6), (2, 8), 3, True)],
)
def test_kronecker_macs_match_formula(a_shape, b_shape, rank, input_side_first):
    """With x reshaped to X (n1, n2), one term is A·X·Bᵀ: the two matmuls of the order the layer picked."""
    (m1, n1), (m2, n2) = a_shape, b_shape
    layer = KroneckerLinear(n1 * n2, m1 * m2, a_shape, b_shape, rank=rank)
    assert layer._input_side_first is input_side_first
    if input_side_first:  # (X·Bᵀ): n1·n2·m2, then A·(X·Bᵀ): m1·n1·m2
        per_row = rank * (n1 * n2 * m2 + m1 * n1 * m2)
    else:  # (A·X): m1·n1·n2, then (A·X)·Bᵀ: m1·n2·m2
        per_row = rank * (m1 * n1 * n2 + m1 * n2 * m2)
    out = count_macs(layer, _x(T, n1 * n2))
    assert out["total"] == out["linear"] == T * per_row
    assert out["total"] < T * layer.in_features * layer.out_features


@pytest.mark.parametrize(("method", "ranks"), [("tt", [3, 3, 3]), ("tucker", [2, 2, 2, 2]), ("cp", [3])])
def test_tensorized_macs_match_its_own_cost_model(method, ranks):
    layer = TensorizedLinear(IN, OUT, method, [4, 6], [6, 8], ranks)
    assert count_macs(layer, _x())["total"] == T * layer.macs_per_row


def test_int8_and_4bit_kernels_are_counted():
    """FlopCounterMode has no formula for quantized::linear_dynamic nor bitsandbytes' gemm_4bit: added here."""
    out = count_macs(Int8DynamicLinear.from_linear(nn.Linear(IN, OUT)), torch.randn(2, 3, IN))
    assert out["total"] == 6 * IN * OUT and out["complete"]
    pytest.importorskip("bitsandbytes")
    from llmshrink.bnb import BnbSpec, quantize_layer

    # As the quantize pass makes it: a raw Linear4bit in eval mode takes bitsandbytes' AVX512-BF16 repack
    # path on such CPUs, which needs out_features % 32 == 0 (OUT is 24).
    linear = nn.Linear(IN, OUT)
    layer = quantize_layer(linear.weight, linear.bias, BnbSpec("bnb-nf4"))
    for rows in (1, T):
        out = count_macs(layer, torch.randn(1, rows, IN))
        assert out["total"] == rows * IN * OUT and out["complete"], out


class _Elementwise(nn.Module):
    """A weight layer computed by broadcasting, which FlopCounterMode does not count."""

    in_features, out_features = IN, OUT

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(OUT, IN))

    def forward(self, x):
        return (x.unsqueeze(-2) * self.weight).sum(-1)


class _MatVec(_Elementwise):
    def forward(self, x):
        return torch.mv(self.weight, x)


def test_uncounted_layers_and_ops_are_reported():
    model = nn.Sequential(nn.Linear(IN, IN), _Elementwise())
    out = count_macs(model, _x())
    assert out["total"] == T * IN * IN  # only the Linear
    assert out["uncounted_modules"] == ["1"] and not out["complete"]
    out = count_macs(_MatVec(), torch.randn(IN))
    assert out["uncounted_ops"] == ["aten.mv"] and out["total"] == 0 and not out["complete"]


def _linear_macs(model: nn.Module) -> int:
    """Σ in·out over the Linear / Conv1D weights (lm_head included, even when tied)."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_model_macs_per_token_match_hand_formula(make):
    model = make()
    config = model.config
    seq = 16
    out = macs_per_token(model, seq_len=seq)
    linear = _linear_macs(model)
    # Attention per token and layer: scores q·kᵀ over seq keys and weights·v, each seq·hidden (all heads).
    attention = config.num_hidden_layers * 2 * seq * config.hidden_size
    assert out["linear"] == linear
    assert out["attention"] == attention
    assert out["total"] == linear + attention and out["complete"]
    assert out["by_module"]["lm_head"] == config.vocab_size * config.hidden_size
    batched = macs_per_token(model, seq_len=seq, batch_size=3)
    assert batched["total"] == out["total"] and batched["batch_size"] == 3


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_decode_macs_use_the_cached_context(make):
    model = make()
    context = 20
    out = macs_per_decode_token(model, context=context, batch_size=2)
    attention = model.config.num_hidden_layers * 2 * (context + 1) * model.config.hidden_size
    assert out["linear"] == _linear_macs(model)
    assert out["attention"] == attention and out["complete"]
    assert out["context"] == context


def test_shared_block_counts_at_every_position():
    base = tiny_llama()
    shared = tiny_llama()
    ref = SharedBlockRef("model.layers.0", 1)
    shared.model.layers[1] = ref
    ref.bind(shared)
    assert count_params(shared) < count_params(base)
    assert macs_per_token(shared, seq_len=8)["total"] == macs_per_token(base, seq_len=8)["total"]


def test_macs_bad_lengths_raise():
    model = tiny_gpt2()  # 128 positions
    with pytest.raises(LlmshrinkError, match="129 positions"):
        macs_per_decode_token(model, context=128)
    with pytest.raises(LlmshrinkError, match=">= 1"):
        macs_per_token(model, seq_len=0)


def test_measure_memory_peaks_in_a_subprocess(tmp_path):
    model = tiny_llama(layers=4, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8,
                       max_position_embeddings=64)
    weights_mib = count_params(model) * 4 / 2**20  # ~52 MiB of fp32
    path = save_tiny(model, tmp_path / "ck")
    out = measure_memory(path, prompt_tokens=8, new_tokens=4, batch_size=2)
    assert out["peak_rss_generate_mb"] >= out["peak_rss_load_mb"] >= out["rss_before_load_mb"] > 0
    assert out["peak_rss_load_mb"] - out["rss_before_load_mb"] >= 0.9 * weights_mib, out
    assert out["generated_tokens"] == 4 and out["batch_size"] == 2


def test_measure_memory_is_the_childs_own_peak_not_its_parents(tmp_path):
    # Linux keeps ru_maxrss across fork + exec, so a child of a big process would report the parent's peak.
    path = save_tiny(tiny_llama(), tmp_path / "ck")
    ballast = torch.ones(2 * 2**30 // 4)  # 2 GiB, touched: resident in this (parent) process
    out = measure_memory(path, prompt_tokens=4, new_tokens=2)
    assert out["peak_rss_generate_mb"] < 1500 < 2048 <= peak_rss_mb(), out
    del ballast


def test_measure_memory_failure_raises_with_the_child_error(tmp_path):
    with pytest.raises(LlmshrinkError, match="no such file or directory"):
        measure_memory(tmp_path / "missing", prompt_tokens=4, new_tokens=2)


def test_measure_latency_counts_every_sequence_of_the_batch():
    model = tiny_gpt2()
    out = measure_latency(model, 128, prompt_tokens=8, new_tokens=4, batch_size=3, repeats=1, warmup=0)
    assert out["tokens_per_s"] == pytest.approx(3 * 1000 / out["decode_ms_per_token"])
    assert out["batch_size"] == 3 and out["decode_ms_per_token"] > 0


def test_decode_speed_excludes_the_prefill():
    model = tiny_llama()
    # A prefill (more than one new position) costs 0.3 s more; a decode step (one position) nothing more.
    model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: time.sleep(0.3) if args[0].shape[1] > 1 else None)
    out = measure_latency(model, 128, prompt_tokens=8, new_tokens=4, repeats=1, warmup=0)
    assert out["prefill_ms"] >= 300
    assert out["decode_ms_per_token"] < 75, out  # 0.3 s / 4 tokens = 75 ms each had the prefill been counted
    assert out["tokens_per_s"] == pytest.approx(1000 / out["decode_ms_per_token"])
    assert out["tokens_per_s"] > 2 * 4 / 0.3  # generate's 4 tokens / (0.3 s + decode) would be under 4 / 0.3


def _mixed_model() -> nn.Module:
    """Tied embeddings, fp32 / fp16 / bf16 parameters and int8 buffers (Int8DynamicLinear) in one model."""
    model = tiny_llama()
    layers = model.model.layers
    layers[0].mlp.gate_proj = Int8DynamicLinear.from_linear(layers[0].mlp.gate_proj)
    layers[0].self_attn.half()
    layers[1].mlp.bfloat16()
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, _mixed_model, lambda: tiny_llama().to(torch.float16)])
def test_safetensors_bytes_is_exact_and_writes_nothing(make, tmp_path, monkeypatch):
    model = make()
    written = save_tiny(model, tmp_path / "ck") / "model.safetensors"  # what a checkpoint really holds
    scratch = tmp_path / "systmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def no_writes(*args, **kwargs):
        raise AssertionError("safetensors_bytes wrote a file")

    monkeypatch.setattr(safetensors.torch, "save_file", no_writes)
    assert safetensors_bytes(model) == written.stat().st_size
    assert list(scratch.iterdir()) == []


def test_report_rows_for_the_new_metrics():
    base = {"params": 1000, "macs_per_token": 134_515_008, "peak_ram_load_mb": 900.4}
    comp = {"params": 780, "macs_per_token": 105_572_160, "peak_ram_load_mb": 700.0,
            "decode_ms_per_token": 12.345}
    rows = {r[0]: r for r in comparison_rows(base, comp)}
    assert rows["MACs/token (M)"][1:] == ["134.52", "105.57", "0.78x"]
    assert rows["peak RAM, load (MiB)"][1:] == ["900", "700", "0.78x"]
    assert rows["decode ms/token"][1:] == ["-", "12.35", "-"]
    # Optional metrics nobody measured print no row; the original rows stay.
    assert "peak RAM, generate (MiB)" not in rows and "decode MACs/token (M)" not in rows
    labels = [r[0] for r in comparison_rows({"params": 1}, {"params": 1})]
    assert labels == ["params", "size on disk (MB)", "perplexity", "decode tokens/s", "prefill ms",
                      "load time (s)", "compression time (s)"]
