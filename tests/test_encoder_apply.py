"""`llmshrink apply` on encoders, end to end on a tiny random BERT: the recipe's task: section scores the base and
the compressed model, the checkpoint reloads exactly and (for embeddings) loads in sentence-transformers."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import WORDS, model_dir, tiny_tokenizer

from llmshrink.cli import main


def bert_dir(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=len(tiny_tokenizer()), max_position_embeddings=64, pad_token_id=1)
    return model_dir(BertModel(config).eval(), tmp_path / "bert")


def pairs_file(tmp_path, split: str, count: int):
    """Graded pairs: a sentence and a copy with `k` of its 6 words replaced, scored 5 - k."""
    rng = random.Random(split)
    rows = []
    for _ in range(count):
        words = [rng.choice(WORDS[:40]) for _ in range(6)]
        changed = rng.randrange(6)
        other = [rng.choice(WORDS[40:]) if i < changed else w for i, w in enumerate(words)]
        rows.append({"text": " ".join(words), "text_pair": " ".join(other), "score": float(5 - changed)})
    path = tmp_path / f"pairs_{split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_an_embedding_model_is_pruned_scored_on_its_task_and_saved_for_sentence_transformers(tmp_path, capsys,
                                                                                            monkeypatch):
    from llmshrink.eval.encoder_eval import EncoderTask

    scored = []
    scores = EncoderTask.scores
    monkeypatch.setattr(EncoderTask, "scores", lambda self, model: scored.append(model) or scores(self, model))
    base = bert_dir(tmp_path)
    for split, count in (("train", 24), ("test", 40)):
        pairs_file(tmp_path, split, count)
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
name: tiny-embedding
device: cpu
model: {{id: '{base}', task: embedding}}
task: {{kind: similarity, source: '{tmp_path}/pairs_{{split}}.jsonl'}}
stages:
  - prune_ffn: {{keep: 0.5, importance: magnitude}}
  - prune_heads: {{keep: 0.5, importance: magnitude}}
evaluate: {{latency: {{batch_size: 4, repeats: 1}}, memory: false}}
output: {{dir: '{out}'}}
""")
    assert main(["apply", str(recipe)]) == 0
    manifest = json.loads((out / "llmshrink.json").read_text())
    base_metrics, compressed = manifest["metrics"]["base"], manifest["metrics"]["compressed"]
    for metrics in (base_metrics, compressed):
        assert -1.0 <= metrics["spearman"] <= 1.0 and -1.0 <= metrics["pearson"] <= 1.0
        assert metrics["batch_ms"] > 0 and "perplexity" not in metrics
    assert compressed["params"] < base_metrics["params"]
    assert manifest["checks"]["reload_max_abs_logit_diff"] == 0.0
    assert [row["stage"] for row in manifest["stages"]] == ["0:prune_ffn", "1:prune_heads"]
    assert all("spearman" in row for row in manifest["stages"])
    # Scored once per stage row and once for the base: the compressed model's scores are the last row's.
    assert len(scored) == 3 and compressed["spearman"] == manifest["stages"][-1]["spearman"]
    assert "spearman" in (out / "report.md").read_text()
    assert "pipeline_tag: feature-extraction" in (out / "README.md").read_text()

    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoModel

    from llmshrink.eval.task_eval import sentence_embeddings

    texts = ["the a of and", "he she it that for on with"]
    loaded = st.SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    ours = sentence_embeddings(AutoModel.from_pretrained(out, trust_remote_code=True).eval(), tiny_tokenizer(), texts)
    assert torch.allclose(torch.as_tensor(loaded.encode(texts)), ours, atol=1e-5)
    assert "apply" not in capsys.readouterr().err
