"""GGUF export (llmshrink/export/gguf.py) on tiny random Llama and GPT-2 models: the file loads in llama.cpp
(llama-cpp-python) and computes the compressed model's logits (f32 within float error, f16 / q8_0 / q4_0 / q4_k
within the bounds measured here), pruned blocks become per-block arrays (deci), the tokenizer travels and
tokenizes as Hugging Face does; what llama.cpp cannot hold is refused in one line, and nothing is written then."""

from __future__ import annotations

import json
import string
import sys

import pytest
import torch
from conftest import WORDS, calibrated, tiny_gpt2, tiny_llama, tiny_tokenizer
from gguf import GGUFReader
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import llmshrink.export.gguf as gguf_export
from llmshrink.checkpoint import save_checkpoint
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.latency import torch_greedy_speed
from llmshrink.eval.perplexity import perplexity
from llmshrink.export.gguf import export_gguf, text_probe
from llmshrink.export.gguf_runtime import INSTALL, gguf_decode_speed, gguf_logits, gguf_perplexity
from llmshrink.registry import get_pass

QUIET = {"log": lambda _: None}
SPACE = "▁"  # SentencePiece's word boundary


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama 2 style tokenizer.json (BPE with byte fallback, words joined by ▁) of single characters only: llama.cpp
    reads it as gguf.LlamaHfVocab writes it and tokenizes exactly as Hugging Face does (with merges it may not:
    see test_tokenizers_llama_cpp_cannot_reproduce_are_refused)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for char in SPACE + string.ascii_letters + string.digits + ".,;:!?'\"()-":
        vocab.setdefault(char, len(vocab))
    return _llama_style(vocab, [])


def _llama_style(vocab: dict, merges: list) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _lines() -> list[str]:
    return [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(12)) for i in range(200)]


def merged_tokenizer() -> PreTrainedTokenizerFast:
    """char_tokenizer's layout with BPE merges learned on WORDS."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    trained.train_from_iterator(_lines(), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(char_tokenizer().vocab)
    for token in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(token, len(vocab))
    return _llama_style(vocab, [tuple(m) for m in spec["merges"]])


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained here: its pre-tokenizer hash is none llama.cpp knows."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_lines(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# Each case: (family, stages on a 3-block model, quant types exported); CONFIG: the tiny model's other settings. Llama: hidden 64, 4 heads of 16, 2 kv, FFN 192.
CASES = {
    # drop block 0, then block 0 (was 1) keeps half its FFN, block 1 half its heads: different blocks -> deci
    "llama-pruned": ("llama", [("drop_layers", {"layers": [0]}),
                               ("prune_ffn", {"keep": 0.5, "layers": [0], "importance": "magnitude"}),
                               ("prune_heads", {"keep": 0.5, "layers": [1], "importance": "magnitude"})],
                     ("f32", "f16", "q8_0")),
    # every block pruned alike -> plain llama with scalar hparams (and a head size that is no longer hidden/heads)
    "llama-uniform": ("llama", [("prune_ffn", {"keep": 0.5, "importance": "magnitude"}),
                                ("prune_heads", {"keep": 0.5, "importance": "magnitude"})], ("f32", "q4_0")),
    "llama-untied": ("llama", [("drop_layers", {"layers": [1]})], ("f32",)),
    "gpt2-pruned": ("gpt2", [("drop_layers", {"layers": [0]}), ("prune_ffn", {"keep": 0.5, "importance": "magnitude"})],
                    ("f32", "f16", "q8_0")),
}
# max |Δlogit| / max |logit| on the text probe, measured on these models (llama-cpp-python 0.3.36, x86 CPU):
# f32 2.5e-7 (Llama), 6.5e-5 (GPT-2: ggml's f16 GELU table); f16 2.2e-4; q8_0 5.8e-3; q4_0 5.9e-2; q4_k 9.6e-2
# (hidden 256). Top-1 agreement 1.0 except q4_k 0.89. The bounds leave ~3x.
CONFIG = {"llama-untied": {"tie_word_embeddings": False}}  # an output layer of its own
BOUNDS = {"f32": 1e-6, "f16": 1e-3, "q8_0": 2e-2, "q4_0": 0.2, "q4_k": 0.3}
GPT2_F32 = 2e-4


def compress(family: str, stages: list, layers: int = 3, **config):
    model = BUILDERS[family](layers=layers, vocab_size=VOCAB, **config)
    for name, settings in stages:
        spec = get_pass(name)
        spec.apply(model, spec.config_cls(**settings), calibrated())
    return model


def save(model, path, tokenizer=TOKENIZER):
    return save_checkpoint(model, tokenizer, path, recipe_text="name: t\n", manifest={"name": "t"}, model_card="# t\n")


def metadata(path) -> dict:
    return {name: field.contents() for name, field in GGUFReader(path).fields.items()
            if not name.startswith("GGUF.") and name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")}


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason=INSTALL)


@pytest.fixture(scope="module")
def exports(llama_cpp, tmp_path_factory):
    """{case: (compressed model, checkpoint, {quant: (out folder, result)})}."""
    root = tmp_path_factory.mktemp("gguf")
    done = {}
    for case, (family, stages, quants) in CASES.items():
        model = compress(family, stages, **CONFIG.get(case, {}))
        checkpoint = save(model, root / case)
        done[case] = model, checkpoint, {q: (root / f"{case}-{q}", export_gguf(checkpoint, root / f"{case}-{q}", q,
                                                                                **QUIET)) for q in quants}
    return done


@pytest.mark.parametrize(("case", "quant"), [(c, q) for c, (_, _, qs) in CASES.items() for q in qs])
def test_the_gguf_computes_the_compressed_models_logits_in_llama_cpp(exports, case, quant):
    model, checkpoint, results = exports[case]
    out, result = results[quant]
    family = CASES[case][0]
    # The f32 file (made and checked in every export) is the model up to float summation order.
    f32 = result["f32_check"]["max_abs_diff"] / result["max_abs_logit"]
    assert f32 <= (GPT2_F32 if family == "gpt2" else BOUNDS["f32"]) and result["f32_check"]["tolerance"] > 0
    assert result["relative_diff"] <= (max(BOUNDS[quant], GPT2_F32) if family == "gpt2" else BOUNDS[quant])
    assert result["checked_top1_agreement"] >= (0.9 if quant == "q4_0" else 0.98)
    assert result["relative_diff"] <= result["expected_relative_diff"]

    # Independently: llama.cpp on the file against the compressed model on the same probe.
    path = out / f"model-{quant}.gguf"
    ids = text_probe(TOKENIZER, model.config)
    with torch.no_grad():
        want = model(ids).logits
    got = gguf_logits(path, ids)
    assert float((got - want).abs().max()) == pytest.approx(result["max_abs_logit_diff"], rel=1e-3, abs=1e-6)

    # The folder: the file and export.json only, nothing left beside it; the checkpoint untouched.
    assert sorted(p.name for p in out.iterdir()) == ["export.json", f"model-{quant}.gguf"]
    assert json.loads((out / "export.json").read_text()) == result
    assert result["bytes"] == path.stat().st_size and not list(out.parent.glob(".*tmp*"))
    assert set(result["tensor_types"]) <= {"F32", "F16", "Q8_0", "Q4_0"}


def test_blocks_that_differ_become_per_block_arrays_of_the_deci_architecture(exports):
    _, _, results = exports["llama-pruned"]
    result = results["f16"][1]
    assert result["architecture"] == "deci" and result["ffn_widths"] == [96, 192]
    assert result["head_counts"] == [[4, 2], [2, 1]]
    meta = metadata(results["f16"][0] / "model-f16.gguf")
    assert meta["general.architecture"] == "deci" and meta["general.file_type"] == 1  # MOSTLY_F16
    assert list(meta["deci.feed_forward_length"]) == [96, 192]
    assert list(meta["deci.attention.head_count"]) == [4, 2]
    assert list(meta["deci.attention.head_count_kv"]) == [2, 1]
    assert meta["deci.attention.key_length"] == 16 and meta["deci.rope.dimension_count"] == 16
    assert meta["deci.block_count"] == 2 and meta["deci.embedding_length"] == 64
    assert results["f16"][1]["tensor_types"] == {"F16": 15, "F32": 5}  # 2-D weights f16; norms f32; tied head
    assert results["q8_0"][1]["tensor_types"] == {"F32": 5, "Q8_0": 15}


def test_blocks_alike_stay_llama_with_scalars_and_the_tokenizer_travels(exports):
    _, _, results = exports["llama-uniform"]
    meta = metadata(results["f32"][0] / "model-f32.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["llama.feed_forward_length"] == 96 and meta["llama.attention.head_count"] == 2
    assert meta["llama.attention.head_count_kv"] == 1 and meta["llama.attention.key_length"] == 16
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False  # as the checkpoint's tokenizer: it adds none
    # q4_0: the tied token_embd/output goes to q8_0 (llama.cpp wants q6_k there, whose rows of 256 do not fit 64)
    assert results["q4_0"][1]["tensor_types"] == {"F32": 7, "Q4_0": 21, "Q8_0": 1}
    tensors = {t.name for t in GGUFReader(results["q4_0"][0] / "model-q4_0.gguf").tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    untied = {t.name for t in GGUFReader(exports["llama-untied"][2]["f32"][0] / "model-f32.gguf").tensors}
    assert {"output.weight", "token_embd.weight", "blk.1.ffn_down.weight"} <= untied


def test_gpt2_keeps_one_ffn_width_and_its_layout(exports):
    _, _, results = exports["gpt2-pruned"]
    meta = metadata(results["f32"][0] / "model-f32.gguf")
    assert meta["general.architecture"] == "gpt2" and meta["gpt2.block_count"] == 2
    assert meta["gpt2.feed_forward_length"] == 128 and meta["gpt2.attention.head_count"] == 4
    assert meta["gpt2.context_length"] == 128


def test_perplexity_in_llama_cpp_equals_pytorch(exports):
    model, _, results = exports["llama-uniform"]
    ids = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(1))
    for bos in (None, 1):
        want = perplexity(model, ids, window=32, stride=16, bos_token_id=bos, progress=False)
        got = gguf_perplexity(results["f32"][0] / "model-f32.gguf", ids, window=32, stride=16, bos_token_id=bos,
                              f32_cache=True)
        assert got.tokens_scored == want.tokens_scored and got.ppl == pytest.approx(want.ppl, rel=1e-5)
        assert got.protocol == {**want.protocol, "runtime": "llama.cpp"}


def test_decode_speed_in_llama_cpp_decodes_the_models_greedy_tokens(exports):
    model, _, results = exports["llama-uniform"]
    prompt = [5, 9, 33, 2, 100, 7]
    got = gguf_decode_speed(results["f32"][0] / "model-f32.gguf", prompt, new_tokens=12, repeats=1)
    assert got["tokens"] == torch_greedy_speed(model, prompt, new_tokens=12, repeats=1, warmup=0)["tokens"]
    assert got["prompt_tokens"] == 6 and got["prefill_ms"] > 0 and got["decode_tokens_per_s"] > 0


def test_k_quants_where_rows_are_multiples_of_256(llama_cpp, tmp_path, monkeypatch):
    # hidden 256, 4 heads of 64, FFN 512: every quantized row is 256 or 512 values long
    model = compress("llama", [], layers=2, hidden_size=256, intermediate_size=512)
    monkeypatch.setitem(gguf_export.EXPECTED, "q4_k", 0.01)  # as if this model were fragile
    lines = []
    result = export_gguf(save(model, tmp_path / "ckpt"), tmp_path / "out", "q4_k", log=lines.append)
    assert result["relative_diff"] <= BOUNDS["q4_k"] and result["checked_top1_agreement"] >= 0.8
    assert {"Q4_K", "Q6_K"} <= set(result["tensor_types"])  # Q4_K_M: most q4_k, some q6_k
    # Beyond what the type does to a recovered model: written, and said (not refused: the file is right).
    assert len(lines) == 2 and "is sensitive to rounding; measure its perplexity in llama.cpp" in lines[1]


def test_a_bfloat16_checkpoint_is_checked_against_its_weights_in_float32(llama_cpp, tmp_path):
    # Kronecker factors in bf16: the file holds their product in f32, the model as it runs rounds at bf16 (~1e-2 of
    # a logit, 10x F32_RTOL): the f32 check is against the model cast to f32, the as-run difference only reported.
    model = compress("llama", [("kronecker", {"search_iters": 2})], layers=2).to(torch.bfloat16)
    checkpoint = save(model, tmp_path / "ckpt")
    result = export_gguf(checkpoint, tmp_path / "out", "f32", **QUIET)
    assert result["f32_check"]["max_abs_diff"] / result["max_abs_logit"] <= BOUNDS["f32"]
    assert result["max_abs_logit_diff"] > 10 * result["f32_check"]["max_abs_diff"]  # bf16's own rounding
    assert result["top1_agreement"] >= 0.9 and (tmp_path / "out" / "model-f32.gguf").is_file()


def test_k_quants_refused_where_rows_are_not(llama_cpp, tmp_path):
    checkpoint = save(compress("llama", CASES["llama-pruned"][1]), tmp_path / "ckpt")
    with pytest.raises(LlmshrinkError) as err:
        export_gguf(checkpoint, tmp_path / "out", "q4_k", **QUIET)
    assert str(err.value) == ("gguf: q4_k needs every quantized row to be a multiple of 256 values (llama.cpp's "
                              "k-quant block); this model has rows of 32, 64, 96, 192: use q4_0 (4-bit) or q8_0 "
                              "instead (blocks of 32)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize(("stages", "message"), [
    ([("prune_ffn", {"keep": 0.5, "layers": [1], "importance": "magnitude"})],
     "gguf: the blocks of transformer.h have different FFN widths [256, 128]; llama.cpp's gpt2 graph reads one "
     "feed_forward_length"),
    ([("prune_heads", {"keep": 0.5, "importance": "magnitude"})],
     "gguf: the blocks of transformer.h keep [2, 2] of 4 attention heads; llama.cpp's gpt2 graph sizes attention as "
     "n_embd x n_embd, so it cannot hold pruned heads"),
], ids=["ffn-widths", "pruned-heads"])
def test_gpt2_shapes_llama_cpp_cannot_hold_are_refused(llama_cpp, tmp_path, stages, message):
    checkpoint = save(compress("gpt2", stages, layers=2), tmp_path / "ckpt")
    with pytest.raises(LlmshrinkError) as err:
        export_gguf(checkpoint, tmp_path / "out", "f16", **QUIET)
    assert str(err.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize(("tokenizer", "message"), [
    (tiny_tokenizer, "gguf: the tokenizer is a WordLevel model; llama.cpp tokenizes byte-level BPE (GPT-2, SmolLM2) "
                     "and BPE with byte fallback (Llama 2, MobileLLM) the way the model saw text, not this one"),
    (byte_level_tokenizer, "gguf: the tokenizer's pre-tokenizer is not one llama.cpp is known to reproduce "
                           "(convert_hf_to_gguf's hash "),
    # gguf.LlamaHfVocab gives every token the same score, so llama.cpp's SentencePiece merges in another order
    (merged_tokenizer, "gguf: llama.cpp tokenizes the probe text differently from the checkpoint's tokenizer (from "
                       "token "),
], ids=["word-level", "unknown-pre-tokenizer", "merge-order"])
def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(llama_cpp, tmp_path, tokenizer, message):
    tok = tokenizer()
    checkpoint = save(tiny_llama(layers=1, vocab_size=max(len(tok), 128)), tmp_path / "ckpt", tok)
    with pytest.raises(LlmshrinkError) as err:
        export_gguf(checkpoint, tmp_path / "out", "f32", **QUIET)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_wrong_layout_is_refused_by_the_f32_check(llama_cpp, tmp_path, monkeypatch):
    checkpoint = save(compress("llama", [], layers=2), tmp_path / "ckpt")
    monkeypatch.setattr(gguf_export, "_permute", lambda weight, heads, head_dim: weight)  # RoPE halves not interleaved
    with pytest.raises(LlmshrinkError) as err:
        export_gguf(checkpoint, tmp_path / "out", "q8_0", **QUIET)
    assert str(err.value).startswith("gguf: llama.cpp's logits of the f32 file differ from the compressed model's by ")
    assert str(err.value).endswith("(0.001 x max |logit|): the file does not compute the model; nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_existing_output_or_one_inside_the_checkpoint_is_refused(llama_cpp, tmp_path):
    checkpoint = save(compress("llama", [], layers=1), tmp_path / "ckpt")
    (tmp_path / "out").mkdir()
    with pytest.raises(LlmshrinkError) as err:
        export_gguf(checkpoint, tmp_path / "out", **QUIET)
    assert str(err.value) == (f"gguf: {tmp_path / 'out'} already exists; choose another output path (an export "
                              "never overwrites)")
    assert not list((tmp_path / "out").iterdir())
    with pytest.raises(LlmshrinkError) as err:
        export_gguf(checkpoint, checkpoint / "gguf", **QUIET)
    assert str(err.value) == (f"gguf: {checkpoint / 'gguf'} is inside the checkpoint {checkpoint}, which an export "
                              "never modifies; choose another output path")
    with pytest.raises(LlmshrinkError) as err:
        export_gguf(checkpoint, tmp_path / "other", "q3_k", **QUIET)
    assert str(err.value) == ("gguf: --quant 'q3_k' is not a GGUF type here; allowed: f32, f16, q8_0, q4_0, q4_k, "
                              "q5_k, q6_k")


def test_without_llama_cpp_python_one_line_says_what_to_install(tmp_path, monkeypatch):
    checkpoint = save(tiny_llama(layers=1, vocab_size=VOCAB), tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    with pytest.raises(LlmshrinkError) as err:
        export_gguf(checkpoint, tmp_path / "out", **QUIET)
    assert str(err.value) == ('gguf: the GGUF export writes and checks the file with llama.cpp through '
                              'llama-cpp-python, which is not installed: pip install -e ".[export]"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.slow
def test_smollm2s_tokenizer_travels_as_gpt2_bpe_with_its_pre_tokenizer(llama_cpp, tmp_path):
    from llmshrink.models import load_base_model

    tok = load_base_model("builtin:smollm2-135m", log=lambda _: None).tokenizer
    checkpoint = save(tiny_llama(layers=2, vocab_size=len(tok)), tmp_path / "ckpt", tok)
    result = export_gguf(checkpoint, tmp_path / "out", "f16", **QUIET)  # its own check: llama.cpp tokenizes alike
    meta = metadata(tmp_path / "out" / "model-f16.gguf")
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.add_bos_token"] is False and "tokenizer.chat_template" in meta
    assert len(meta["tokenizer.ggml.merges"]) > 40000 and result["relative_diff"] <= BOUNDS["f16"]
