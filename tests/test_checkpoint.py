"""Checkpoints reload exactly: through llmshrink, and through plain transformers remote code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import reload_without_llmshrink, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import llmshrink
import llmshrink.checkpoint as ckpt
from llmshrink.checkpoint import apply_layout, compressed_layout, save_checkpoint
from llmshrink.checkpoint_load import load_checkpoint, load_tokenizer
from llmshrink.errors import LlmshrinkError
from llmshrink.hub import model_card
from llmshrink.modules import KroneckerLinear

RECIPE = "name: tiny\noutput: {dir: out/tiny}\n"
MANIFEST = {"name": "tiny", "base_model": {"id": "tiny-random"}, "passes": [{"pass": "kronecker", "record": {"rank": 2}}]}
IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64], [3, 3, 120, 0, 17, 42, 8, 1]])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def kron_gpt2() -> GPT2LMHeadModel:
    model = tiny_gpt2(n_positions=64)
    gen = torch.Generator().manual_seed(1)
    mlp = model.transformer.h[0].mlp  # c_fc: Conv1D 64 -> 256
    mlp.c_fc = KroneckerLinear.from_linear(
        mlp.c_fc, (16, 8), (16, 8), rank=2,
        row_perm=torch.randperm(256, generator=gen), col_perm=torch.randperm(64, generator=gen),
    )
    return model.eval()


def plain_llama() -> LlamaForCausalLM:
    return tiny_llama(intermediate_size=128, pad_token_id=None)


def kron_llama() -> LlamaForCausalLM:
    model = plain_llama()
    mlp = model.model.layers[1].mlp  # up_proj: Linear 64 -> 128
    mlp.up_proj = KroneckerLinear.from_linear(mlp.up_proj, (8, 8), (16, 8), rank=2)
    return model.eval()


BUILDERS = {"gpt2": kron_gpt2, "llama": kron_llama}


def save(model, out: Path, **kwargs) -> Path:
    card = model_card(MANIFEST, RECIPE)
    return save_checkpoint(model, tiny_tokenizer(), out, recipe_text=RECIPE, manifest=MANIFEST, model_card=card, **kwargs)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(params=sorted(BUILDERS))
def saved(request, tmp_path):
    model = BUILDERS[request.param]()
    return model, save(model, tmp_path / "out" / request.param)


def test_roundtrip_is_exact_and_strict(saved):
    model, out = saved
    loaded = llmshrink.load(out)
    assert not loaded.training
    assert (logits(loaded) - logits(model)).abs().max().item() == 0.0
    assert set(loaded.state_dict()) == set(model.state_dict())
    file_keys = set(load_file(out / "model.safetensors"))
    assert "lm_head.weight" not in file_keys  # tied: written once
    assert set(loaded.state_dict()) - file_keys == {"lm_head.weight"}
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert compressed_layout(loaded) == compressed_layout(model)
    assert not hasattr(loaded.config, "auto_map")


def test_checkpoint_files_and_config(saved):
    model, out = saved
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "llmshrink.json", "README.md",
            "modeling_llmshrink.py", "kronecker.py", "tokenizer.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    config = json.loads((out / "config.json").read_text())
    base = type(model).__name__
    assert config["architectures"] == [f"Llmshrink{base}"]
    assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_llmshrink.Llmshrink{base}"}
    assert config["llmshrink_layout"] == compressed_layout(model)
    assert config["tie_word_embeddings"] is True
    # The live model's config is left as it was (save_pretrained sets architectures; we put it back).
    assert model.config.architectures is None
    assert not hasattr(model.config, "auto_map") and not hasattr(model.config, "llmshrink_layout")
    manifest = json.loads((out / "llmshrink.json").read_text())
    assert manifest["name"] == "tiny" and manifest["llmshrink_version"] == llmshrink.__version__
    assert manifest["architecture"] == base and manifest["created_utc"].endswith("+00:00")
    assert (out / "recipe.yaml").read_text() == RECIPE
    src = Path(llmshrink.modules.kronecker.__file__).read_text()
    assert (out / "kronecker.py").read_text() == src  # copied verbatim
    assert load_tokenizer(out)("w5 w9 w3")["input_ids"] == [5, 9, 3]


def test_remote_code_loads_without_llmshrink(tmp_path):
    models = {name: build() for name, build in BUILDERS.items()}
    outs = {name: save(model, tmp_path / name) for name, model in models.items()}
    reloaded = reload_without_llmshrink(outs, IDS, layer="KroneckerLinear",
                                        probe="def probe(model, name):\n    return type(model).__name__\n")
    assert list(reloaded) == list(models)
    for name, got in reloaded.items():
        assert got["probe"] == f"Llmshrink{type(models[name]).__name__}"
        # The layer class came from the checkpoint folder (copied by transformers), not from llmshrink.
        assert got["layers"] and all(module.startswith(f"transformers_modules.{name}.")
                                     and module.endswith(".kronecker") for module in got["layers"])
        assert (got["logits"] - logits(models[name])).abs().max().item() == 0.0


def test_existing_dir_is_refused(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(LlmshrinkError) as err:
        save(kron_llama(), out)
    assert str(err.value) == f"output.dir: {out} already exists; set output.overwrite: true or choose another dir"
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_overwrite_replaces_atomically(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "stale").write_text("old")
    model = kron_llama()
    save(model, out, overwrite=True)
    assert not (out / "stale").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # old copy and temp dir both gone
    assert torch.equal(logits(load_checkpoint(out)), logits(model))


@pytest.mark.parametrize("existing", [False, True])
def test_failure_midway_leaves_no_trace(tmp_path, monkeypatch, existing):
    out = tmp_path / "x"
    if existing:
        out.mkdir()
        (out / "keep").write_text("old")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "write_remote_code", boom)  # after weights and tokenizer are written
    with pytest.raises(RuntimeError, match="disk full"):
        save(kron_llama(), out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == (["x"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep"]


def _rewrite_weights(out: Path, change) -> None:
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.a"), "1 tensor(s) missing from the weights: model.layers.1.mlp.up_proj.a"),
        (lambda t: t.pop("model.embed_tokens.weight"), "missing from the weights: lm_head.weight, model.embed_tokens.weight"),
        (lambda t: t.update(extra=torch.zeros(2)), "1 tensor(s) the rebuilt model does not have: extra"),
        (lambda t: t["model.norm.weight"].__setitem__(0, float("nan")), "model.norm.weight: contains NaN or inf"),
        (lambda t: t.update({"model.norm.weight": torch.ones(3)}), "model.norm.weight: saved (3,)"),
    ],
    ids=["missing", "missing-tied-source", "unexpected", "nan", "shape"],
)
def test_corrupt_weights_raise_one_line(tmp_path, change, expected):
    out = save(kron_llama(), tmp_path / "x")
    _rewrite_weights(out, change)
    with pytest.raises(LlmshrinkError) as err:
        load_checkpoint(out)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_missing_files_raise_one_line(tmp_path):
    with pytest.raises(LlmshrinkError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nope")
    out = save(kron_llama(), tmp_path / "x")
    (out / "llmshrink.json").unlink()
    with pytest.raises(LlmshrinkError, match=r"not an llmshrink checkpoint \(no llmshrink.json\)"):
        load_checkpoint(out)


def test_layout_errors_name_the_module(tmp_path):
    model = plain_llama()
    with pytest.raises(LlmshrinkError, match=r"llmshrink_layout.model.nope.x: LlamaForCausalLM has no such module"):
        apply_layout(model, {"model.nope.x": {"type": "KroneckerLinear", "args": {}}})
    with pytest.raises(LlmshrinkError, match="unknown layer type 'Foo'; known: .*KroneckerLinear"):
        apply_layout(model, {"lm_head": {"type": "Foo", "args": {}}})
    bad = {"in_features": 64, "out_features": 128, "a_shape": [3, 3], "b_shape": [3, 3]}
    with pytest.raises(LlmshrinkError, match="cannot build KroneckerLinear: factor shapes"):
        apply_layout(model, {"model.layers.0.mlp.up_proj": {"type": "KroneckerLinear", "args": bad}})


def test_uncompressed_model_saves_plain_checkpoint(tmp_path):
    model = tiny_gpt2(layers=1, n_embd=32, n_head=2, n_inner=128, n_positions=16)
    out = save(model, tmp_path / "plain")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["GPT2LMHeadModel"]
    assert not (out / "modeling_llmshrink.py").exists()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(model))
    assert torch.equal(logits(load_checkpoint(out)), logits(model))


def test_bfloat16_reloads_in_bfloat16(tmp_path):
    # Loaded the way a base model is (from_pretrained keeps the rotary buffers in float32), then compressed.
    plain_llama().save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16).eval()
    mlp = model.model.layers[0].mlp
    mlp.up_proj = KroneckerLinear.from_linear(mlp.up_proj, (8, 8), (16, 8), rank=2)
    loaded = load_checkpoint(save(model, tmp_path / "bf16"))
    assert loaded.model.layers[0].mlp.up_proj.a.dtype == torch.bfloat16
    assert compressed_layout(loaded) == compressed_layout(model)
    assert torch.equal(logits(loaded), logits(model))


def test_input_dir_is_never_overwritten(tmp_path):
    plain_llama().save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    before = sorted(p.name for p in (tmp_path / "base").iterdir())
    with pytest.raises(LlmshrinkError, match=r"base is the input model; choose another dir"):
        save(model, tmp_path / "base", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == before


def test_model_card():
    manifest = {
        "name": "smol-kron", "base_model": {"id": "HuggingFaceTB/SmolLM2-135M", "revision": "abc"},
        "metrics": {"base": {"params": 134_515_008, "perplexity": 20.0},
                    "compressed": {"params": 67_257_504, "perplexity": 25.0}},
        "evaluation": {"perplexity": {"dataset": "builtin:shakespeare", "split": "test", "window": 512,
                                      "stride": 256, "tokens": 1000, "bos": False}},
        "passes": [{"pass": "kronecker", "record": {"rank": 1, "layers": [1, 2]}}],
    }
    card = model_card(manifest, RECIPE)
    front = card.split("---\n")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in front and "- llmshrink" in front
    assert "library_name: transformers" in front
    assert "| params | 134,515,008 | 67,257,504 | 0.50x |" in card
    assert "| perplexity | 20.00 | 25.00 | 1.25x |" in card
    assert "Perplexity protocol: dataset builtin:shakespeare (test), window 512, stride 256" in card
    assert "1. `kronecker`: rank=1" in card and "layers" not in card.split("## Passes")[1].split("\n\n")[1]
    assert "trust_remote_code=True" in card and "llmshrink.load(" in card and RECIPE.strip() in card
    # The built-in model is a GGUF of SmolLM2-135M-Instruct: the card names its upstream on the hub.
    builtin = model_card({"base_model": {"id": "builtin:smollm2-135m"}}, RECIPE).split("---\n")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in builtin
