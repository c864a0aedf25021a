"""ONNX export (llmshrink/export/onnx.py) on tiny Llama, GPT-2 and BERT: a Llama with a dropped block, FFN widths and
head counts that differ between blocks, and a GPT-2 with a dropped block, per-block FFN widths and pruned heads
(shapes no plain transformers config holds) export; in onnxruntime their logits equal PyTorch's, and decoding with
the KV cache gives PyTorch's greedy tokens; int8 and int4-weights load and are smaller, their loss measured; an
encoder exports; perplexity in onnxruntime equals PyTorch's; an existing output, a failed check and missing
packages are refused in one line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import calibrated, save_tiny, tiny_bert, tiny_gpt2, tiny_llama
from test_export_hf_dense import snapshot

import llmshrink.export.onnx as onnx_export
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.perplexity import perplexity
from llmshrink.export.onnx import export_onnx
from llmshrink.export.onnx_run import INSTALL, OnnxModel, decode_speed, greedy, onnx_perplexity
from llmshrink.registry import get_pass

RUNTIME = ("onnx", "onnxscript", "onnxruntime")
QUIET = {"log": lambda _: None}
IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3, 17, 40], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1, 77, 6]])
# Of 4 Llama blocks (FFN 192, 4 query heads of 16, 2 kv) block 0 is dropped; then, of the 3 left, block 1 keeps half
# its FFN neurons and block 2 half its heads. GPT-2 (3 blocks, FFN 256, 4 heads): the same, with its own head unit.
# A larger initializer_range than the default makes greedy decoding wander over the vocabulary instead of repeating
# one token, so that the KV-cache check sees different tokens at every step.
STAGES = [("drop_layers", {"layers": [0]}), ("prune_ffn", {"keep": 0.5, "layers": [1], "importance": "magnitude"}),
          ("prune_heads", {"keep": 0.5, "layers": [2], "importance": "magnitude"})]
MODELS = {"llama": lambda: tiny_llama(layers=4, initializer_range=0.3),
          "gpt2": lambda: tiny_gpt2(layers=4, initializer_range=0.2),
          "bert": lambda: tiny_bert(layers=2)}
KV_SHAPES = {"llama": [(2, 16), (2, 16), (1, 16)], "gpt2": [(4, 16), (4, 16), (2, 16)]}  # (kv heads, size) per block
EXPORTS = [("llama", None), ("llama", "int8"), ("gpt2", None), ("gpt2", "int4-weights"), ("bert", None)]


@pytest.fixture(scope="module")
def runtime():
    for name in RUNTIME:
        pytest.importorskip(name, reason=f"the ONNX export needs {name}: {INSTALL}")


def compressed(family: str) -> torch.nn.Module:
    model = MODELS[family]()
    stages = [("prune_ffn", {"keep": 0.5, "importance": "magnitude"})] if family == "bert" else STAGES
    for name, settings in stages:
        spec = get_pass(name)
        spec.apply(model, spec.config_cls(**settings), calibrated())
    return model


@pytest.fixture(scope="module")
def exports(runtime, tmp_path_factory):
    """{(family, quant): (compressed model, checkpoint, its snapshot before, out, result)}."""
    root = tmp_path_factory.mktemp("onnx")
    models, done = {}, {}
    for family, quant in EXPORTS:
        if family not in models:
            model = compressed(family)
            models[family] = model, save_tiny(model, root / family)
        model, checkpoint = models[family]
        before, out = snapshot(checkpoint), root / "exports" / f"{family}-{quant or 'fp32'}"
        done[family, quant] = model, checkpoint, before, out, export_onnx(checkpoint, out, quant=quant, **QUIET)
    return done


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruned_decoders_compute_pytorchs_logits_and_greedy_tokens_in_onnxruntime(exports, family):
    model, checkpoint, before, out, result = exports[family, None]
    # fp32 in onnxruntime against the compressed model in PyTorch: float rounding only (measured <= 4e-5 on logits
    # of max |x| ~10), where the export's own tolerance is 1e-4 x max |logit|.
    assert result["checked"] == "max_abs_diff" and result["checked_max_abs_diff"] <= 1e-4 < result["limit"]
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] == result["checked_max_abs_diff"]
    greedy_check = result["greedy"]
    assert greedy_check["same_tokens"] and greedy_check["onnx_tokens"] == greedy_check["pytorch_tokens"]
    assert len(set(greedy_check["pytorch_tokens"])) > 4  # the decode wanders: every step is a real check
    assert greedy_check["checked_max_abs_diff"] <= 1e-4 < greedy_check["limit"]

    # The file itself, here: per-block kv heads as pruned, optimum's names, dynamic batch / sequence / past.
    runtime = OnnxModel(out)
    assert runtime.past == KV_SHAPES[family]
    assert runtime.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert runtime.input_names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert runtime.output_names[:3] == ["logits", "present.0.key", "present.0.value"] and len(runtime.output_names) == 7
    with torch.no_grad():
        want = model(IDS).logits
    assert (runtime.logits(IDS.numpy()) - want).abs().max() <= 1e-4
    # Free-running greedy decode with the cache, against generate() of the compressed model.
    prompt = IDS[:1, :6]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy(runtime, prompt.numpy(), 10) == generated[0, 6:].tolist()
    # A batch of two after a shared past: each row continues its own cache.
    logits, past = runtime(IDS[:, :7].numpy())
    step, _ = runtime(IDS[:, 7:9].numpy(), past=past)
    assert np.abs(step - want[:, 7:9].numpy()).max() <= 1e-4

    # The folder: the graph, the tokenizer, export.json; no config.json (no plain config holds these shapes).
    names = sorted(p.name for p in out.iterdir())
    assert names == ["export.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    assert not result["plain_config"] and "different FFN widths" in result["plain_config_refused"]
    assert json.loads((out / "export.json").read_text()) == result
    assert result["bytes"] == (out / "model.onnx").stat().st_size
    assert not list(out.parent.glob(".*tmp*")) and snapshot(checkpoint) == before


@pytest.mark.parametrize(("family", "quant"), [("llama", "int8"), ("gpt2", "int4-weights")])
def test_quantized_graphs_load_are_smaller_and_their_loss_is_measured(exports, family, quant):
    *_, fp32 = exports[family, None]
    _, _, _, out, result = exports[family, quant]
    assert result["quant"] == quant and result["bytes"] < 0.75 * fp32["bytes"]
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "tokenizer.json",
                                                      "tokenizer_config.json"]  # no fp32 graph left over
    # The graph before quantization passed the fp32 check; the quantized one is measured (these tiny models have
    # large random weights, hard on 8 and 4 bits: measured llama int8 0.11, gpt2 int4-weights 0.27), and refused
    # only where its logits are no closer to the model's than zeros (relative error 1).
    graph = result["fp32_graph"]
    assert graph["checked_max_abs_diff"] <= 1e-4 and graph["greedy"]["same_tokens"]
    assert result["checked"] == "relative_error" and result["limit"] == 1.0
    assert 1e-3 < result["checked_relative_error"] < 0.4 and result["greedy"]["checked_relative_error"] < 0.4
    assert result["top1_agreement"] >= 0.5 and result["greedy"]["agreement"] >= 0.5
    assert OnnxModel(out).past == KV_SHAPES[family]


def test_encoder_exports_its_logits_with_a_padding_mask(exports):
    model, _, _, out, result = exports["bert", None]
    assert result["kind"] == "encoder" and "greedy" not in result and result["checked_max_abs_diff"] <= 1e-5
    assert result["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and result["outputs"] == ["logits"]
    mask = torch.ones_like(IDS)
    mask[1, 8:] = 0
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=mask).logits
    got, _ = OnnxModel(out)(IDS.numpy(), mask=mask.numpy())
    assert np.abs(got - want.numpy()).max() <= 1e-5
    assert result["plain_config"] and json.loads((out / "config.json").read_text())["intermediate_size"] == 64
    with pytest.raises(LlmshrinkError, match="^onnx: perplexity needs a decoder"):
        onnx_perplexity(out, IDS[0], window=8, stride=8)


@pytest.mark.parametrize("bos", [None, 1])
def test_perplexity_in_onnxruntime_equals_pytorchs(exports, bos):
    model, *_, out, _ = exports["gpt2", None]
    text = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(3))
    want = perplexity(model, text, window=32, stride=16, bos_token_id=bos, progress=False)
    got = onnx_perplexity(out, text, window=32, stride=16, bos_token_id=bos)
    assert got.tokens_scored == want.tokens_scored and abs(got.nll - want.nll) <= 1e-5
    assert {**got.protocol, "runtime": None} == {**want.protocol, "runtime": None}


def test_decode_speed_reports_prefill_and_tokens_per_second(exports):
    out = exports["gpt2", None][3]
    speed = decode_speed(out, IDS[0].numpy(), new_tokens=8, repeats=1)
    assert speed["prompt_tokens"] == 12 and speed["new_tokens"] == 8
    assert speed["prefill_ms"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["tokens"] == greedy(OnnxModel(out), IDS[0].numpy(), 8)


def test_an_existing_output_is_refused_and_left_alone(runtime, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(LlmshrinkError) as err:
        export_onnx(tmp_path / "ckpt", tmp_path / "out")
    assert str(err.value) == f"onnx: {tmp_path / 'out'} already exists; choose another output path (an export never " \
                             "overwrites)"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    with pytest.raises(LlmshrinkError, match=r"^onnx: --quant 'int4' is not an ONNX quantization; allowed: none"):
        export_onnx(tmp_path / "ckpt", tmp_path / "new", quant="int4")


def test_a_bfloat16_checkpoint_is_checked_against_its_weights_in_float32(runtime, tmp_path):
    # The fp32 graph holds the product of bf16 Kronecker factors in f32; the model as it runs rounds at bf16. The tight
    # fp32 check is against the model cast to f32; the as-run difference (bf16's own rounding) is only reported.
    model = tiny_llama(layers=2)
    spec = get_pass("kronecker")
    spec.apply(model, spec.config_cls(search_iters=2), calibrated())
    result = export_onnx(save_tiny(model.to(torch.bfloat16), tmp_path / "ckpt"), tmp_path / "out", **QUIET)
    assert result["checked"] == "max_abs_diff" and result["checked_max_abs_diff"] <= result["limit"]
    assert result["greedy"]["same_tokens"] and result["max_abs_logit_diff"] > 10 * result["checked_max_abs_diff"]


def test_a_failed_check_writes_nothing(runtime, tmp_path, monkeypatch):
    checkpoint = save_tiny(tiny_gpt2(), tmp_path / "ckpt")

    def broken_export(model, path):
        path.write_bytes(b"not a graph")
        raise LlmshrinkError("onnx: torch.onnx.export failed on GPT2LMHeadModel: (simulated)")

    monkeypatch.setattr(onnx_export, "_export_decoder", broken_export)
    with pytest.raises(LlmshrinkError, match=r"\(simulated\)$"):
        export_onnx(checkpoint, tmp_path / "out", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # The verdict itself: logits beyond the limit, and an fp32 greedy token PyTorch would not pick.
    result = {"checked": "max_abs_diff", "checked_max_abs_diff": 0.5, "limit": 0.1}
    with pytest.raises(LlmshrinkError) as err:
        onnx_export._verdict(result, None)
    assert str(err.value) == ("onnx: the exported model's logits in onnxruntime (prefill) differ from PyTorch's: "
                              "max |Δ| 0.5, above the limit 0.1; nothing was written")
    result = {"checked": "max_abs_diff", "checked_max_abs_diff": 0.0, "limit": 0.1,
              "greedy": {"checked": "relative_error", "checked_relative_error": float("nan"), "limit": 1.0}}
    with pytest.raises(LlmshrinkError, match=r"\(decoding with the KV cache\) differ from PyTorch's: "
                                             r"\|\|Δ\|\| / \|\|logits\|\| nan, above the limit 1;"):
        onnx_export._verdict(result, "int8")
    result["greedy"] = {"checked": "max_abs_diff", "checked_max_abs_diff": 0.0, "limit": 0.1, "same_tokens": False,
                        "first_difference": 3}
    with pytest.raises(LlmshrinkError, match="picks another token than PyTorch's greedy decode at step 3;"):
        onnx_export._verdict(result, None)
    onnx_export._verdict(result, "int8")  # a quantized graph may pick other tokens: reported, not refused


def test_missing_packages_give_one_line_naming_the_install(monkeypatch, tmp_path):
    for name in RUNTIME:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(LlmshrinkError) as err:
        export_onnx(tmp_path / "ckpt", tmp_path / "out")
    assert str(err.value) == 'onnx: the export needs onnx, onnxscript, onnxruntime, not installed: pip install -e ".[export]"'
    assert not (tmp_path / "out").exists()
