"""hf-dense export (llmshrink/export/hf_dense.py) on tiny GPT-2 and Llama: for every pass that changes layers, the
exported plain transformers model (loaded where llmshrink cannot be imported) computes the compressed model's
logits; shapes no plain config holds, an existing output and a failed check are refused in one line; the
checkpoint is never touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import calibrated, reload_without_llmshrink, save_tiny, tiny_gpt2, tiny_llama
from torch import nn

import llmshrink.export.hf_dense as hf_dense
import llmshrink.modules.int8_dynamic as int8_dynamic
from llmshrink.errors import LlmshrinkError
from llmshrink.export.hf_dense import densify, export_hf_dense
from llmshrink.modules import COMPRESSED_MODULES
from llmshrink.registry import get_pass

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 3, 3], [4, 8, 15, 16, 23, 42, 99, 0, 12, 1]])
BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
EMBEDDINGS = {"gpt2": "transformer.wte|transformer.wpe", "llama": ".*embed_tokens"}
# Each case: the stages run, in order, on a 2-block model (combined: 3 blocks, of which drop_layers leaves 2).
CASES = {
    "kronecker": [("kronecker", {"search_iters": 2})],  # permuted rows and columns
    "low_rank": [("low_rank", {"rank": 4, "embeddings": True, "tied_embeddings": "untie"})],  # + the word table
    "tensorize": [("tensorize", {"rank": 4})],
    "cluster": [("cluster", {"bits": 3})],
    "prune_magnitude": [("prune_magnitude", {"sparsity": 0.5})],
    "int8": [("quantize", {"method": "int8-dynamic", "embeddings": True, "tied_embeddings": "untie"})],
    "qat": [("qat", {"activations": True})],
    "bnb_nf4": [("quantize", {"method": "bnb-nf4"})],
    "bnb_int8": [("quantize", {"method": "bnb-int8"})],
    "share_layers": [("share_layers", {"mode": "repeat"})],
    "drop_layers": [("drop_layers", {"layers": [0]})],
    "prune_ffn": [("prune_ffn", {"keep": 0.5, "importance": "magnitude"})],
    "prune_heads": [("prune_heads", {"keep": 0.5, "importance": "magnitude"})],
    "query_heads": [("prune_heads", {"keep": 0.5, "importance": "magnitude", "unit": "query_head"})],
    "combined": [("drop_layers", {"layers": [0]}), ("prune_ffn", {"keep": 0.5, "importance": "magnitude"}),
                 ("prune_heads", {"keep": 0.5, "importance": "magnitude"}),
                 ("low_rank", {"rank": 8, "targets": r".*attn\..*"}), ("share_layers", {"mode": "repeat"}),
                 ("quantize", {"method": "int8-dynamic", "targets": r".*\.mlp\..*"})],
}
# GPT-2's attention takes its head size from n_embd / n_head: pruned heads have no plain config (refused below).
HEADS = {"prune_heads", "query_heads"}
RUNS = [(family, case) for family in BUILDERS for case in CASES if not (family == "gpt2" and case in HEADS)]
# Cases whose compressed forward rounds layer inputs at run time (8-bit activations); the export computes in float.
ROUNDING = {"int8", "qat", "bnb_int8", "combined"}
# The export's config where a pass changed shapes (of 2 blocks; Llama: FFN 192, 4 heads of 16, 2 kv; GPT-2: FFN 256).
CONFIG = {
    ("llama", "prune_ffn"): {"intermediate_size": 96},
    ("gpt2", "prune_ffn"): {"n_inner": 128},
    ("llama", "prune_heads"): {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16},
    ("llama", "query_heads"): {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16},
    ("llama", "drop_layers"): {"num_hidden_layers": 1},
    ("gpt2", "drop_layers"): {"n_layer": 1},
    ("llama", "combined"): {"num_hidden_layers": 2, "intermediate_size": 96, "num_attention_heads": 2},
    ("gpt2", "combined"): {"n_layer": 2, "n_inner": 128},
}


def compress(family: str, stages: list, layers: int = 2) -> nn.Module:
    model = BUILDERS[family](layers=layers)
    for name, settings in stages:
        if family == "gpt2" and name == "prune_heads":
            continue
        if settings.get("embeddings") and name == "quantize":
            settings = {**settings, "embedding_targets": EMBEDDINGS[family]}
        spec = get_pass(name)
        spec.apply(model, spec.config_cls(**settings), calibrated())
    return model


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Each file's size, modification time and content hash."""
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns,
                                          hashlib.sha256(f.read_bytes()).hexdigest())
            for f in sorted(folder.rglob("*")) if f.is_file()}


@torch.no_grad()
def float_logits(model: nn.Module) -> torch.Tensor:
    """The compressed model's logits with its layers' run-time input rounding off, by their own switches: the int8
    layer's float path (what it runs without fbgemm), FakeQuantLinear without activations, bnb int8 left out."""
    fake = [m for m in model.modules() if type(m).__name__ == "FakeQuantLinear" and m.activations]
    saved, int8_dynamic.FBGEMM = int8_dynamic.FBGEMM, False
    try:
        for m in fake:
            m.activations = False
        return model(IDS).logits
    finally:
        int8_dynamic.FBGEMM = saved
        for m in fake:
            m.activations = True


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(family, case): (compressed model, checkpoint, its snapshot before the export, out, result or error)}, and the
    exports' logits on IDS from plain transformers without llmshrink (one subprocess for all)."""
    root = tmp_path_factory.mktemp("hf_dense")
    done = {}
    for family, case in RUNS:
        model = checkpoint = before = None
        out = root / "exports" / f"{family}-{case}"
        try:
            model = compress(family, CASES[case], layers=3 if case == "combined" else 2)
            checkpoint = save_tiny(model, root / f"{family}-{case}")
            before = snapshot(checkpoint)
            result = export_hf_dense(checkpoint, out, log=lambda _: None)
        except Exception as err:  # reported by that case's test
            result = err
        done[family, case] = model, checkpoint, before, out, result
    written = {f"{family}-{case}": out for (family, case), (*_, out, result) in done.items()
               if not isinstance(result, Exception)}
    return done, reload_without_llmshrink(written, IDS, layer="Linear")


@pytest.mark.parametrize(("family", "case"), RUNS, ids=[f"{f}-{c}" for f, c in RUNS])
def test_export_computes_the_compressed_models_logits(exports, family, case):
    done, reloaded = exports
    model, checkpoint, before, out, result = done[family, case]
    if isinstance(result, Exception):
        raise result
    # The export's own check: fp32 differences only (measured here: at most 2.4e-7 on logits of max |x| ~1.3).
    assert result["checked_max_abs_diff"] <= 1e-6 and result["checked_max_abs_diff"] <= result["tolerance"]
    assert 0.5e-4 < result["tolerance"] < 2e-4  # 1e-4 x max |logit| (~1.0-1.6 on these models)
    if case in ROUNDING:
        # Against the model as it runs: its 8-bit input rounding (measured 0.003-0.006), not float error.
        assert result["rounding_layers"] > 0 and 1e-4 < result["max_abs_logit_diff"] < 0.02
    else:
        assert result["max_abs_logit_diff"] == result["checked_max_abs_diff"] and result["top1_agreement"] == 1.0

    # Loaded where llmshrink cannot be imported: the logits of the compressed model (its input rounding off).
    got = reloaded[f"{family}-{case}"]
    reference = float_logits(model)
    if case == "bnb_int8":  # bnb has no float switch: its own forward, within its rounding
        assert (got["logits"] - reference).abs().max() < 0.02
    else:
        assert (got["logits"] - reference).abs().max() <= 1e-6
    assert set(got["layers"]) == {"torch.nn.modules.linear"}  # every Linear is torch's (GPT-2: the lm_head)

    # A plain folder: no remote code, no llmshrink keys; the config holds the pruned shapes.
    assert not list(out.glob("*.py")) and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and not [key for key in config if key.startswith("llmshrink")]
    assert "quantization_config" not in config and config["architectures"] == [type(model).__name__]
    assert {key: config[key] for key in CONFIG.get((family, case), {})} == CONFIG.get((family, case), {})
    assert json.loads((out / "export.json").read_text()) == result
    assert result["path"] == str(out) and result["bytes"] == (out / "model.safetensors").stat().st_size
    assert not list(out.parent.glob(".*tmp*"))
    # The checkpoint is read, never written.
    assert snapshot(checkpoint) == before


def test_shared_blocks_become_copies_with_their_own_cache_slot():
    model = compress("llama", CASES["share_layers"])
    want = model(IDS).logits
    densify(model)
    blocks = model.model.layers
    assert not [m for m in model.modules() if type(m).__name__ in COMPRESSED_MODULES]
    assert blocks[0] is not blocks[1] and blocks[1].self_attn.layer_idx == 1
    assert torch.equal(blocks[0].mlp.up_proj.weight, blocks[1].mlp.up_proj.weight)
    assert torch.allclose(model(IDS).logits, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("family", "stages", "message"), [
    ("llama", [("prune_ffn", {"keep": 0.5, "layers": [0], "importance": "magnitude"})],
     "hf-dense: the blocks of model.layers have different FFN widths [96, 192]; a plain LlamaForCausalLM config has "
     "one intermediate_size: such a model needs the checkpoint's remote code (trust_remote_code=True) or the gguf "
     "export (llama.cpp reads per-layer widths)"),
    ("gpt2", [("prune_ffn", {"keep": 0.5, "layers": [1], "importance": "magnitude"})],
     "hf-dense: the blocks of transformer.h have different FFN widths [256, 128]; a plain GPT2LMHeadModel config has "
     "one n_inner: such a model needs the checkpoint's remote code (trust_remote_code=True) or the gguf export "
     "(llama.cpp reads per-layer widths)"),
    ("llama", [("prune_heads", {"keep": 0.5, "layers": [0], "importance": "magnitude"})],
     "hf-dense: the blocks of model.layers have different head counts (query, key-value) [(2, 1), (4, 2)]; a plain "
     "LlamaForCausalLM config has one num_attention_heads and num_key_value_heads: such a model needs the "
     "checkpoint's remote code (trust_remote_code=True) or the gguf export (llama.cpp reads per-layer head counts)"),
    ("gpt2", [("prune_heads", {"keep": 0.5, "importance": "magnitude"})],
     "hf-dense: the blocks of transformer.h keep [2, 2] of 4 attention heads; a plain GPT2LMHeadModel takes its head "
     "size from the hidden size / heads, so no config describes pruned heads: such a model needs the checkpoint's "
     "remote code (trust_remote_code=True)"),
], ids=["llama-ffn-widths", "gpt2-ffn-widths", "llama-head-counts", "gpt2-pruned-heads"])
def test_shapes_no_plain_config_holds_are_refused_in_one_line(tmp_path, family, stages, message):
    model = BUILDERS[family]()
    for name, settings in stages:
        spec = get_pass(name)
        spec.apply(model, spec.config_cls(**settings), calibrated())
    checkpoint = save_tiny(model, tmp_path / "ckpt")
    before = snapshot(checkpoint)
    with pytest.raises(LlmshrinkError) as err:
        export_hf_dense(checkpoint, tmp_path / "out", log=lambda _: None)
    assert str(err.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and snapshot(checkpoint) == before


def test_an_existing_output_or_one_inside_the_checkpoint_is_refused(tmp_path):
    checkpoint = save_tiny(compress("llama", CASES["kronecker"]), tmp_path / "ckpt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(LlmshrinkError) as err:
        export_hf_dense(checkpoint, tmp_path / "out")
    assert str(err.value) == (f"hf-dense: {tmp_path / 'out'} already exists; choose another output path "
                              "(an export never overwrites)")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    with pytest.raises(LlmshrinkError) as err:
        export_hf_dense(checkpoint, checkpoint / "dense")
    assert str(err.value) == (f"hf-dense: {checkpoint / 'dense'} is inside the checkpoint {checkpoint}, which an "
                              "export never modifies; choose another output path")


def test_logits_beyond_the_tolerance_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    checkpoint = save_tiny(compress("gpt2", CASES["kronecker"]), tmp_path / "ckpt")
    exact = hf_dense.layer_weight
    monkeypatch.setattr(hf_dense, "layer_weight", lambda module: exact(module) * 1.01)  # a 1% error in each layer
    with pytest.raises(LlmshrinkError) as err:
        export_hf_dense(checkpoint, tmp_path / "out", log=lambda _: None)
    assert str(err.value).startswith("hf-dense: the exported model's logits differ from the compressed model's by ")
    assert str(err.value).endswith("(0.0001 x max |logit|); nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
