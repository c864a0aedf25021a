"""Perplexity protocol, size / speed metrics and the report, on tiny seeded models."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.latency import load_time, measure_latency, timed
from llmshrink.eval.memory import peak_rss_mb
from llmshrink.eval.perplexity import perplexity
from llmshrink.eval.report import comparison_rows, format_table, protocol_line, write_report_md
from llmshrink.eval.size import count_bytes, count_params, dir_size, has_tied_embeddings, safetensors_bytes
from llmshrink.modules.clustered import ClusteredLinear
from llmshrink.modules.int8_dynamic import Int8DynamicLinear
from llmshrink.modules.kronecker import KroneckerLinear

VOCAB = 101


class UniformLM(nn.Module):
    """Returns zero logits: every next token has probability 1 / vocab."""

    def __init__(self, vocab: int, positions: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, n_positions=positions)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.config.vocab_size))


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2(n_head=2, n_embd=32, n_inner=None, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                     eos_token_id=0)


@pytest.fixture(scope="module")
def text_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(1))


def _token_logprob(model, ids: torch.Tensor, start: int, t: int) -> float:
    """log p(ids[t] | ids[start:t]) from a full forward over exactly that context."""
    with torch.no_grad():
        logits = model(input_ids=ids[start:t].unsqueeze(0)).logits[0, -1]
    return F.log_softmax(logits.float(), -1)[ids[t]].item()


def test_uniform_model_perplexity_is_vocab_size():
    ids = torch.randint(0, 37, (40,), generator=torch.Generator().manual_seed(0))
    result = perplexity(UniformLM(37, 16), ids, window=16, stride=8, batch_size=2, progress=False)
    assert result.ppl == pytest.approx(37, rel=1e-5)
    assert result.nll == pytest.approx(math.log(37), rel=1e-6)
    assert result.tokens_scored == 39
    assert result.protocol == {"window": 16, "stride": 8, "tokens": 40, "bos": False}


def test_full_window_equals_one_forward(gpt2, text_ids):
    with torch.no_grad():
        logits = gpt2(input_ids=text_ids.unsqueeze(0)).logits[0, :-1]
    expected = F.cross_entropy(logits, text_ids[1:]).item()
    result = perplexity(gpt2, text_ids, window=64, stride=64, progress=False)
    assert result.tokens_scored == 49
    assert result.nll == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_window_matches_per_token_forwards(gpt2, text_ids, batch_size):
    window, stride, n = 16, 5, text_ids.numel()
    # Each token t >= 1 is scored once, by the first window [b, b + window) that reaches past it,
    # with that window's tokens before it as context.
    total, count = 0.0, 0
    for t in range(1, n):
        start = next(b for b in range(0, n, stride) if min(b + window, n) > t)
        total -= _token_logprob(gpt2, text_ids, start, t)
        count += 1
    result = perplexity(gpt2, text_ids, window=window, stride=stride, batch_size=batch_size, progress=False)
    assert result.tokens_scored == count == n - 1
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_stride_equal_to_window_skips_each_window_start(gpt2, text_ids):
    # Windows [0,16) [16,32) [32,48) [48,50): a window's first token has no context, so 50 - 4 scored.
    result = perplexity(gpt2, text_ids, window=16, stride=16, batch_size=2, progress=False)
    assert result.tokens_scored == 46
    expected = (
        -sum(_token_logprob(gpt2, text_ids, (t // 16) * 16, t) for t in range(1, 50) if t % 16 != 0) / 46
    )
    assert result.nll == pytest.approx(expected, rel=1e-5)


def test_bos_scores_every_token_within_window(gpt2, text_ids):
    # BOS takes one slot: 15 text tokens per window, every token scored with BOS before its context.
    result = perplexity(gpt2, text_ids, window=16, stride=15, bos_token_id=0, progress=False)
    assert result.tokens_scored == 50
    assert result.protocol["bos"] is True
    # Each window is [BOS] + 15 text tokens; each text token's context is BOS and the window before it.
    windows = [torch.cat([torch.tensor([0]), text_ids[b : b + 15]]) for b in range(0, 50, 15)]
    expected = -sum(_token_logprob(gpt2, w, 0, j) for w in windows for j in range(1, w.numel())) / 50
    assert result.nll == pytest.approx(expected, rel=1e-5)


def test_perplexity_rejects_short_text_and_long_window(gpt2):
    with pytest.raises(LlmshrinkError, match="at least 2 tokens"):
        perplexity(gpt2, torch.tensor([5]), window=16, stride=8, progress=False)
    with pytest.raises(LlmshrinkError, match="window 128 is longer than the model's 64 positions"):
        perplexity(gpt2, torch.arange(10), window=128, stride=64, progress=False)
    with pytest.raises(LlmshrinkError, match="stride"):
        perplexity(gpt2, torch.arange(10), window=16, stride=17, progress=False)


def test_count_params_counts_tied_embeddings_once(gpt2):
    assert has_tied_embeddings(gpt2)
    named = dict(gpt2.named_parameters(remove_duplicate=False))
    assert "lm_head.weight" in named  # the tied head is listed under both names
    every = sum(p.numel() for p in named.values())
    assert count_params(gpt2) == every - gpt2.transformer.wte.weight.numel()


def test_count_params_dedupes_parameters_sharing_storage():
    m = nn.Module()
    data = torch.randn(4, 5)
    m.p = nn.Parameter(data)
    m.q = nn.Parameter(data)  # a different Parameter object on the same storage
    m.r = nn.Parameter(torch.randn(3))
    assert count_params(m) == 23


def test_count_params_of_kronecker_linear():
    layer = KroneckerLinear(12, 6, (2, 3), (3, 4), rank=2, bias=True, permuted=True)
    assert count_params(layer) == 2 * (2 * 3 + 3 * 4) + 6
    # The permutation index buffers are stored in a checkpoint but are not parameters.
    assert count_bytes(layer) == 42 * 4 + (12 + 6) * 8


def test_count_params_counts_int8_and_clustered_weights_held_in_buffers():
    linear = nn.Linear(12, 6)
    assert count_params(Int8DynamicLinear.from_linear(linear)) == 12 * 6 + 6
    clustered = ClusteredLinear.from_clusters(linear, torch.tensor([-0.1, 0.1]), torch.randint(0, 2, (6, 12)))
    assert count_params(clustered) == 12 * 6 + 2 + 6  # every weight, the 2-entry codebook, the bias
    model = nn.Sequential(Int8DynamicLinear.from_linear(linear), nn.Linear(6, 3, bias=False))
    assert count_params(model) == 12 * 6 + 6 + 6 * 3


def test_safetensors_bytes_is_tensor_bytes_plus_header(gpt2):
    size = safetensors_bytes(gpt2)
    data = count_bytes(gpt2)
    assert data < size < data + 20_000
    untied = GPT2LMHeadModel(GPT2Config(**{**gpt2.config.to_dict(), "tie_word_embeddings": False}))
    assert not has_tied_embeddings(untied)
    assert safetensors_bytes(untied) - size == pytest.approx(
        gpt2.transformer.wte.weight.numel() * 4, abs=2_000
    )


def test_dir_size(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "config.json").write_bytes(b"y" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pytorch_model.bin").write_bytes(b"z" * 7)
    assert dir_size(tmp_path) == 117
    assert dir_size(tmp_path, weights_only=True) == 107
    with pytest.raises(FileNotFoundError):
        dir_size(tmp_path / "missing")


def test_timing_helpers():
    with timed() as t:
        time.sleep(0.01)
    assert t.seconds >= 0.01
    value, seconds = load_time(lambda: 7)
    assert value == 7 and seconds >= 0
    assert peak_rss_mb() > 1


def test_measure_latency_keys_and_positive(gpt2):
    out = measure_latency(gpt2, VOCAB, prompt_tokens=8, new_tokens=4, batch_size=2, repeats=2, warmup=1)
    for key in ("prefill_ms", "decode_ms_per_token", "tokens_per_s"):
        assert out[key] > 0, key
    assert (out["new_tokens"], out["batch_size"], out["repeats"]) == (4, 2, 2)
    assert not gpt2.training


def test_format_table_ratios_and_missing():
    base = {"params": 1000, "size_bytes": 4_000_000, "perplexity": 20.0, "load_seconds": 2.0}
    comp = {"params": 780, "size_bytes": 1_000_000, "compress_seconds": 12.5, "load_seconds": 1.0}
    rows = {r[0]: r for r in comparison_rows(base, comp)}
    assert rows["params"] == ["params", "1,000", "780", "0.78x"]
    assert rows["size on disk (MB)"][1:] == ["4.00", "1.00", "0.25x"]
    assert rows["perplexity"][1:] == ["20.00", "-", "-"]
    assert rows["compression time (s)"][1:] == ["-", "12.5", "-"]
    table = format_table(base, comp)
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "metric" and "ratio" in lines[0]
    assert len({len(line) for line in lines}) == 1  # columns line up
    assert "0.78x" in table and "0.50x" in table


def test_report_md_has_tables_and_protocol(tmp_path):
    protocol = {
        "dataset": "wikitext-2",
        "split": "test",
        "window": 16,
        "stride": 8,
        "tokens": 1234,
        "bos": False,
        "tied_embeddings": True,
    }
    path = write_report_md(
        tmp_path / "out" / "REPORT.md",
        "gpt2-kron",
        {"params": 100, "perplexity": 30.0},
        {"params": 50, "perplexity": 33.0},
        [{"stage": "kronecker", "seconds": 1.5, "params": 50, "perplexity": 40.0}],
        protocol,
        ["distillation was skipped"],
    )
    text = path.read_text()
    line = protocol_line(protocol)
    assert line in text
    assert "window 16" in line and "stride 8" in line and "1,234 tokens" in line
    assert "no BOS" in line and "tied embeddings: yes" in line and "wikitext-2 (test)" in line
    assert "| params | 100 | 50 | 0.50x |" in text
    assert "| kronecker | 1.5 | 50 | 40.00 |" in text
    assert "- distillation was skipped" in text
    assert [p.name for p in path.parent.iterdir()] == ["REPORT.md"]  # no temp file left behind
