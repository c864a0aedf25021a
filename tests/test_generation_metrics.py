"""Generation metrics (hand-checked values), batched greedy generation, the recipe section, the eval data."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from conftest import WORDS, tiny_gpt2, tiny_llama, tiny_tokenizer
from pydantic import ValidationError

from llmshrink.errors import LlmshrinkError
from llmshrink.eval import generation
from llmshrink.eval import specs as eval_specs
from llmshrink.eval.generation import (
    GenerationSpec,
    bleu,
    evaluate_generation,
    generate_texts,
    meteor,
    rouge,
)

DATA = generation.EVALS_DATA


# --- ROUGE -----------------------------------------------------------------------------------------

def test_rouge_hand_checked():
    # Sample 1, stemmed: "the cat sat on the mat" vs "a cat sat on the mat" ("cats" -> "cat"), 6 tokens each.
    #   rouge1: clipped overlap the(1) cat sat on mat = 5 -> P = R = F = 5/6
    #   rouge2: hyp the-cat cat-sat sat-on on-the the-mat; 4 of 5 in ref -> F = 4/5
    #   rougeL: LCS "cat sat on the mat" = 5 -> F = 5/6
    # Sample 2: "dog the barked" vs "the dog barked loudly" (3 vs 4 tokens).
    #   rouge1: 3 overlap -> P = 1, R = 3/4, F = 6/7;  rouge2: no shared bigram -> 0
    #   rougeL: LCS = 2 ("dog barked") -> P = 2/3, R = 1/2, F = 4/7
    # Means: rouge1 (5/6 + 6/7) / 2 = 71/84, rouge2 (4/5 + 0) / 2 = 2/5, rougeL (5/6 + 4/7) / 2 = 59/84.
    scores = rouge(["the cats sat on the mat", "dog the barked"], ["a cat sat on the mat", "the dog barked loudly"])
    assert set(scores) == {"rouge1", "rouge2", "rougeL"}
    assert scores["rouge1"] == pytest.approx(100 * 71 / 84)
    assert scores["rouge2"] == pytest.approx(40.0)
    assert scores["rougeL"] == pytest.approx(100 * 59 / 84)


def test_rouge_takes_best_reference_and_bounds():
    # "a cat" vs refs ["dog", "a cat"]: the second matches fully -> 100 on every metric.
    assert rouge(["a cat"], [["dog", "a cat"]]) == pytest.approx({"rouge1": 100, "rouge2": 100, "rougeL": 100})
    assert rouge(["zebra"], ["a cat"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


# --- BLEU ------------------------------------------------------------------------------------------

def test_bleu_hand_checked():
    # "the cat sat on the mat" vs "the cat sat on a mat", both 6 tokens so brevity penalty 1.
    #   1-grams 5/6 (second "the" clipped), 2-grams 3/5 (the cat, cat sat, sat on),
    #   3-grams 2/4 (the cat sat, cat sat on), 4-grams 1/3 (the cat sat on)
    #   BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** 0.25 = 53.73
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(100 * (1 / 12) ** 0.25)
    # Corpus level, not a mean of sentences: add an exact 3-token pair (3/3, 2/2, 1/1, 0/0) ->
    #   (8/9 * 5/7 * 3/5 * 1/3) ** (1/4) = (120/945) ** 0.25 = 59.69
    two = bleu(["the cat sat on the mat", "hello there friend"], ["the cat sat on a mat", "hello there friend"])
    assert two == pytest.approx(100 * (120 / 945) ** 0.25)
    # Brevity: 5 of the reference's 6 tokens, all n-grams match -> BP = exp(1 - 6/5) = 81.87
    assert bleu(["the cat sat on the"], ["the cat sat on the mat"]) == pytest.approx(100 * math.exp(-0.2))


def test_bleu_several_references():
    # Refs "the cat sat on a mat" / "a cat sat on the mat": counts clip against the max over refs ->
    #   1-grams 5/6 ("the" appears once per ref), 2-grams 5/5, 3-grams 4/4, 4-grams 3/3 -> (5/6) ** 0.25
    refs = ["the cat sat on a mat", "a cat sat on the mat"]
    assert bleu(["the cat sat on the mat"], [refs]) == pytest.approx(100 * (5 / 6) ** 0.25)
    # Mixed counts per prediction (one ref, then two) are allowed and match the all-lists form.
    mixed = bleu(["hello there friend", "the cat sat on the mat"], ["hello there friend", refs])
    assert mixed == bleu(["hello there friend", "the cat sat on the mat"], [["hello there friend"], refs])
    assert 0 < mixed < 100


def test_metric_input_errors():
    with pytest.raises(LlmshrinkError) as err:
        bleu(["a", "b"], ["a"])
    assert str(err.value) == "bleu: 2 predictions but 1 references; need one per prediction"
    with pytest.raises(LlmshrinkError) as err:
        rouge(["a"], [[]])
    assert str(err.value) == "rouge: reference 0 is []; allowed: a string or a non-empty list of strings"
    with pytest.raises(LlmshrinkError, match="no predictions"):
        bleu([], [])


# --- METEOR ----------------------------------------------------------------------------------------

class _Lemma:
    def __init__(self, name: str):
        self._name = name

    def name(self) -> str:
        return self._name


class _Synset:
    def __init__(self, *names: str):
        self._names = names

    def lemmas(self) -> list[_Lemma]:
        return [_Lemma(n) for n in self._names]


class FakeWordNet:
    """nltk's synsets(word) API over a hand-written table."""

    def __init__(self, table: dict[str, list[tuple[str, ...]]]):
        self.table = table

    def synsets(self, word: str) -> list[_Synset]:
        return [_Synset(*names) for names in self.table.get(word, [])]


def test_meteor_synonym_stage():
    hyp, ref = ["The kid ran home."], ["The child ran home."]
    # Tokens: the kid ran home . / the child ran home . (5 each, lower-cased)
    # With kid ~ child: 5 matches, P = R = 1, Fmean = 1, one chunk -> penalty 0.5 * (1/5)^3 = 0.004 -> 0.996
    wordnet = FakeWordNet({"kid": [("kid", "child", "youngster")]})
    assert meteor(hyp, ref, wordnet=wordnet) == pytest.approx(99.6)
    # Without it: 4 matches, P = R = 4/5, Fmean = 0.8; chunks "the" | "ran home ." = 2 -> frag 2/4,
    #   penalty 0.5 * 0.5^3 = 0.0625 -> 0.8 * 0.9375 = 0.75
    assert meteor(hyp, ref, wordnet=FakeWordNet({})) == pytest.approx(75.0)
    # Mean over samples: (99.6 + 0) / 2, and the best of several references.
    assert meteor(hyp + ["zebra"], ref + ["cat"], wordnet=wordnet) == pytest.approx(49.8)
    assert meteor(hyp, [["cat", "The child ran home."]], wordnet=wordnet) == pytest.approx(99.6)


def test_meteor_missing_wordnet_message(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    with pytest.raises(LlmshrinkError) as err:
        meteor(["a cat"], ["a cat"])
    assert str(err.value) == (
        f"METEOR needs the WordNet corpus, which nltk did not find as corpora/wordnet under nltk.data.path "
        f"[{tmp_path}] (NLTK_DATA={tmp_path}); provide it with `python -m nltk.downloader wordnet` on a "
        f"networked machine and copy the nltk_data folder here, or copy Debian's wordnet-base dict files into "
        f"$NLTK_DATA/corpora/wordnet, or leave meteor out of metrics"
    )
    # evaluate_generation checks before generating: no model is needed to see the error.
    with pytest.raises(LlmshrinkError, match="^METEOR needs the WordNet corpus"):
        evaluate_generation(None, None, GenerationSpec(metrics=["rouge", "meteor"]))


# --- generation ------------------------------------------------------------------------------------

def _context_dependent(model: torch.nn.Module, blocks: torch.nn.Module) -> torch.nn.Module:
    """Scale the blocks' matrices: a random tiny model with tied embeddings otherwise just repeats the
    last prompt token, which would hide padding bugs."""
    with torch.no_grad():
        for p in blocks.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


def _models():
    gpt2, llama = tiny_gpt2(), tiny_llama()
    return [("gpt2", _context_dependent(gpt2, gpt2.transformer.h)),
            ("llama", _context_dependent(llama, llama.model.layers))]


def _greedy_reference(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no padding, no cache: argmax of a full forward per step until eos."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            if token.item() == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


def _prompts(n: int = 7, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 15))) for _ in range(n)]


@pytest.mark.parametrize("name,model", _models())
def test_generate_same_text_for_any_batch_size(name, model):
    tok = tiny_tokenizer()
    prompts = _prompts()
    one = generate_texts(model, tok, prompts, max_new_tokens=10, batch_size=1, progress=False)
    four = generate_texts(model, tok, prompts, max_new_tokens=10, batch_size=4, progress=False)
    assert one == four
    # Only the new text, in prompt order, equal to a plain unpadded greedy loop.
    assert four == [_greedy_reference(model, tok, p, 10) for p in prompts]
    assert len(set(four)) > 3  # the outputs depend on the prompt, so the comparison means something


def test_generate_leaves_tokenizer_and_model_as_they_were():
    model = _models()[0][1].train()
    tok = tiny_tokenizer()
    tok.pad_token = None  # like GPT-2's tokenizer: pads with eos instead
    side = tok.padding_side
    texts = generate_texts(model, tok, _prompts(3), max_new_tokens=6, batch_size=3, progress=False)
    assert texts == [_greedy_reference(model.eval(), tok, p, 6) for p in _prompts(3)]
    assert tok.pad_token is None and tok.padding_side == side
    model.train()
    generate_texts(model, tok, ["the cat"], max_new_tokens=2, progress=False)
    assert model.training


def test_generate_cuts_long_prompts_from_the_left():
    model = _models()[0][1]  # 128 positions: with 8 new tokens a prompt keeps its last 120 tokens
    tok = tiny_tokenizer()
    words = [random.Random(2).choice(WORDS) for _ in range(200)]
    long, tail = " ".join(words), " ".join(words[-120:])
    assert generate_texts(model, tok, [long], max_new_tokens=8, progress=False) == \
        generate_texts(model, tok, [tail], max_new_tokens=8, progress=False)
    with pytest.raises(LlmshrinkError) as err:
        generate_texts(model, tok, ["the"], max_new_tokens=128, progress=False)
    assert str(err.value) == ("generation: max_new_tokens=128 leaves no room for a prompt in the model's 128 "
                              "positions; use max_new_tokens < 128")


def test_first_line_and_newline_stop():
    assert generation._first_line("  \n Anna will call.\nBob: ok", True) == "Anna will call."
    assert generation._first_line("  a\nb  ", False) == "a\nb"

    class Decoder:  # token id -> text; 9 is a newline
        def decode(self, ids, skip_special_tokens=True):
            return "".join("\n" if i == 9 else f" w{i}" for i in ids)

    stop = generation._StopAtNewline(Decoder(), prompt_width=2)
    # Rows: no newline yet / newline after text / only a leading newline (not a stop: it is stripped).
    ids = torch.tensor([[5, 5, 1, 2], [5, 5, 3, 9], [5, 5, 9, 4]])
    assert stop(ids, None).tolist() == [False, True, False]


# --- recipe section and end-to-end -----------------------------------------------------------------

def test_evaluate_generation_end_to_end():
    model = _models()[0][1]
    spec = GenerationSpec(limit=5, max_new_tokens=8, batch_size=4)
    first = evaluate_generation(model, tiny_tokenizer(), spec, progress=False)
    second = evaluate_generation(model, tiny_tokenizer(), spec.model_copy(update={"batch_size": 2}), progress=False)
    assert first == second  # greedy: deterministic, whatever the batching
    assert {"rouge1", "rouge2", "rougeL", "bleu"} <= set(first) and "meteor" not in first
    for key in ("rouge1", "rouge2", "rougeL", "bleu"):
        assert 0.0 <= first[key] <= 100.0
    assert first["samples"] == 5
    records = [json.loads(line) for line in open(DATA / "dialogue_summaries_test.jsonl", encoding="utf-8")]
    assert len(first["examples"]) == 3
    for example, record in zip(first["examples"], records[:3], strict=True):
        assert example["prompt"] == f"Summarize the dialogue.\n{record['dialogue']}\nSummary:"
        assert example["reference"] == record["summary"]
        assert isinstance(example["prediction"], str) and "\n" not in example["prediction"]


def test_evaluate_generation_local_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"src": "the cat", "refs": ["a", "b"]}, {"src": "of and", "refs": "to in"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    spec = GenerationSpec(data=str(path), input_field="src", target_field="refs", prompt="Q: {input} A:",
                          max_new_tokens=4, metrics=["bleu"])
    out = evaluate_generation(_models()[1][1], tiny_tokenizer(), spec, progress=False)
    assert set(out) == {"bleu", "samples", "prompts_truncated", "data", "examples"}
    assert out["samples"] == 2 and out["prompts_truncated"] == 0 and out["data"] == str(path)
    assert [e["prompt"] for e in out["examples"]] == ["Q: the cat A:", "Q: of and A:"]
    assert out["examples"][0]["reference"] == ["a", "b"]


def test_spec_errors(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hi", "label": "x"}\n')
    with pytest.raises(LlmshrinkError) as err:
        generation.read_pairs(path, "dialogue", "summary")
    assert str(err.value) == (f"{path}:1: no field 'dialogue' (evaluate.generation.input_field); "
                              f"fields there: label, text")
    with pytest.raises(LlmshrinkError) as err:
        generation.read_pairs(path, "text", "summary")
    assert str(err.value) == f"{path}:1: no field 'summary' (evaluate.generation.target_field); fields there: label, text"
    missing = tmp_path / "none.jsonl"
    with pytest.raises(LlmshrinkError) as err:
        GenerationSpec(data=str(missing)).resolve()
    assert str(err.value).startswith(f"evaluate.generation.data: {missing} does not exist (relative paths")
    with pytest.raises(LlmshrinkError) as err:
        GenerationSpec(data="builtin:dialog_summaries").resolve()
    assert str(err.value) == ("evaluate.generation.data: unknown built-in set 'builtin:dialog_summaries' "
                              "(did you mean builtin:dialogue_summaries?); known: builtin:dialogue_summaries, "
                              "builtin:data_to_text")
    monkeypatch.setattr(eval_specs, "EVALS_DATA", tmp_path / "gone")
    with pytest.raises(LlmshrinkError) as err:
        GenerationSpec().resolve()
    assert str(err.value) == (
        f"evaluate.generation.data: builtin:dialogue_summaries is read from the package's llmshrink/evals/data, "
        f"but {tmp_path / 'gone' / 'dialogue_summaries_test.jsonl'} does not exist (llmshrink installed without "
        f"its package data?); reinstall llmshrink or give a .jsonl path"
    )
    with pytest.raises(ValidationError, match="no {input} placeholder"):
        GenerationSpec(prompt="Summarize:")
    with pytest.raises(ValidationError):
        GenerationSpec(metrics=["bertscore"])
    with pytest.raises(ValidationError):
        GenerationSpec(max_tokens=3)  # misspelt key: extra="forbid"


def test_spec_builtin_defaults():
    task = GenerationSpec(data="builtin:data_to_text").resolve()
    assert task.path == DATA / "data_to_text_test.jsonl"
    assert (task.input_field, task.target_field) == ("meaning_representation", "reference")
    assert "{input}" in task.prompt
    spec = GenerationSpec()
    assert spec.metrics == ["rouge", "bleu"]
    assert spec.resolve().input_field == "dialogue" and spec.resolve().target_field == "summary"


# --- the data files --------------------------------------------------------------------------------

def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in open(DATA / name, encoding="utf-8")]


def test_dialogue_files():
    train, test = _jsonl("dialogue_summaries_train.jsonl"), _jsonl("dialogue_summaries_test.jsonl")
    assert (len(train), len(test)) == (100, 40)
    for row in train + test:
        assert set(row) == {"dialogue", "summary"}
        turns = row["dialogue"].split("\n")
        assert 3 <= len(turns) <= 8
        assert all(re.match(r"^[A-Z][a-z]+: \S", t) for t in turns), turns
        assert 2 <= len({t.split(":", 1)[0] for t in turns}) <= 3
        assert row["summary"].strip() == row["summary"] and "\n" not in row["summary"]
    dialogues = [r["dialogue"] for r in train + test]
    assert len(set(dialogues)) == 140  # no duplicates, so none shared between train and test
    assert len({r["summary"] for r in train + test}) == 140
    lengths = {len(d.split("\n")) for d in dialogues}
    assert min(lengths) == 3 and max(lengths) == 8


def test_data_to_text_file():
    rows = _jsonl("data_to_text_test.jsonl")
    assert len(rows) == 40
    for row in rows:
        assert set(row) == {"meaning_representation", "reference"}
        name = re.match(r"^name\[([^\]]+)\](, \w[\w ]*\[[^\]]+\])+$", row["meaning_representation"]).group(1)
        assert row["reference"].startswith(name)
    assert len({r["meaning_representation"] for r in rows}) == 40
