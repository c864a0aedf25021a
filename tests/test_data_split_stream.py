"""Held-out documents and streaming in distill.data: seeded, disjoint, bounded reads, clear errors."""

from __future__ import annotations

import hashlib
import json
import random

import pydantic
import pytest
import torch
from conftest import WORDS, tiny_tokenizer

from llmshrink.context import Context
from llmshrink.distill.data import load_texts, stream_texts, token_ids
from llmshrink.errors import LlmshrinkError
from llmshrink.specs import DataSpec

N_WORDS = len(WORDS)
EOS = 1  # tiny_tokenizer: <eos> is 1 and WORDS[k] is k + 2


def marker(i: int) -> str:
    """Document i as two vocabulary words that no other document shares, so ids tell documents apart."""
    return f"{WORDS[i // N_WORDS]} {WORDS[i % N_WORDS]}"


def doc_indices(ids: torch.Tensor) -> list[int]:
    """The marker documents in eos-joined ids; a last document cut short by max_tokens is dropped."""
    pieces: list[list[int]] = [[]]
    for token in ids.tolist():
        if token == EOS:
            pieces.append([])
        else:
            pieces[-1].append(token - 2)
    if len(pieces[-1]) < 2:
        pieces.pop()
    assert all(len(piece) == 2 for piece in pieces)
    found = [a * N_WORDS + b for a, b in pieces]
    return found


def write_jsonl(tmp_path, n: int):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": marker(i), "i": i}) for i in range(n)) + "\n")
    return path


def write_txt(tmp_path, n: int):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(marker(i) for i in range(n)) + "\n")
    return path


def streamed_part(seed: int, index: int, heldout: float, fraction: float) -> str | None:
    """The documented rule, restated: u = blake2b(f"{seed}:{index}") in [0, 1) picks the part."""
    u = int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "big") / 2**64
    if u < heldout:
        return "heldout"
    return "train" if (u - heldout) / (1 - heldout) < fraction else None


# --- in memory ----------------------------------------------------------------------------------


def test_heldout_zero_keeps_todays_training_ids(tmp_path):
    tok = tiny_tokenizer()
    src = str(write_txt(tmp_path, 40))
    # Today's rule: shuffle by seed, keep the first max(1, floor(n * fraction)).
    order = list(range(40))
    random.Random(3).shuffle(order)
    assert doc_indices(token_ids(DataSpec(source=src, fraction=0.5, seed=3), tok)) == order[:20]
    assert doc_indices(token_ids(DataSpec(source=src), tok)) == list(range(40))


def test_heldout_split_is_seeded_disjoint_and_training_never_sees_it(tmp_path):
    tok = tiny_tokenizer()
    src = str(write_txt(tmp_path, 40))
    held = doc_indices(token_ids(DataSpec(source=src, heldout=0.25, seed=5), tok, "heldout"))
    train = doc_indices(token_ids(DataSpec(source=src, heldout=0.25, seed=5), tok))
    assert len(held) == 10 and held == sorted(held)  # round(40 * 0.25), in source order
    assert train == sorted(set(range(40)) - set(held))  # fraction 1: all the rest, in source order
    again = token_ids(DataSpec(source=src, heldout=0.25, seed=5), tok, "heldout")
    assert doc_indices(again) == held
    assert doc_indices(token_ids(DataSpec(source=src, heldout=0.25, seed=6), tok, "heldout")) != held
    # fraction and max_tokens apply to training only: half of the 30 left, none of them held out.
    half = doc_indices(token_ids(DataSpec(source=src, heldout=0.25, fraction=0.5, seed=5), tok))
    assert len(half) == 15 and not set(half) & set(held)
    capped = token_ids(DataSpec(source=src, heldout=0.25, max_tokens=7, seed=5), tok, "heldout")
    assert capped.tolist() == again[:7].tolist()
    # A tiny share still holds out one document.
    assert len(doc_indices(token_ids(DataSpec(source=src, heldout=0.001), tok, "heldout"))) == 1


def test_heldout_errors_are_one_line(tmp_path):
    tok = tiny_tokenizer()
    src = str(write_txt(tmp_path, 2))
    with pytest.raises(LlmshrinkError) as err:
        token_ids(DataSpec(source=src), tok, "heldout")
    assert str(err.value) == (
        "data.heldout is 0.0, so no text is held out: set data.heldout to a fraction in (0, 1), e.g. 0.05, "
        "to keep that share of the documents out of training"
    )
    with pytest.raises(LlmshrinkError) as err:
        token_ids(DataSpec(source=src, heldout=0.75), tok)
    assert str(err.value) == (
        f"data.heldout: 0.75 holds out all 2 documents of {src}, leaving none for training: "
        "lower data.heldout or use more text"
    )
    for bad in ({"heldout": 1.0}, {"heldout": -0.1}, {"streaming": "maybe"}, {"held_out": 0.1}):
        with pytest.raises(pydantic.ValidationError):
            DataSpec(**bad)
    with pytest.raises(pydantic.ValidationError):
        DataSpec().heldout = 0.5  # frozen


def test_context_caches_heldout_and_train_ids_separately(tmp_path, monkeypatch):
    import llmshrink.distill.data as data

    calls = []
    real = data.token_ids

    def counting(spec, tokenizer, part="train"):
        calls.append(part)
        return real(spec, tokenizer, part)

    monkeypatch.setattr(data, "token_ids", counting)
    ctx = Context(tokenizer=tiny_tokenizer(), data=DataSpec(source=str(write_txt(tmp_path, 20)), heldout=0.1))
    held = ctx.heldout_token_ids()
    assert ctx.heldout_token_ids() is held and ctx.train_token_ids() is ctx.train_token_ids()
    assert calls == ["heldout", "train"]
    assert len(doc_indices(held)) == 2
    with pytest.raises(LlmshrinkError, match=r"^this pass needs held-out text \(data.heldout > 0\): add a `data:`"):
        Context(tokenizer=tiny_tokenizer()).heldout_token_ids()


# --- streaming ----------------------------------------------------------------------------------


def spy_load_dataset(monkeypatch):
    """Wrap datasets.load_dataset so a test sees its arguments and how many rows were pulled from it."""
    import datasets

    real = datasets.load_dataset
    seen: dict = {"rows": 0, "kwargs": []}

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for row in self.inner:
                seen["rows"] += 1
                yield row

    def load(*args, **kwargs):
        seen["kwargs"].append(kwargs)
        return Counting(real(*args, **kwargs))

    monkeypatch.setattr(datasets, "load_dataset", load)
    return seen


def test_streaming_jsonl_is_seeded_disjoint_and_reads_only_what_it_needs(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    src = str(write_jsonl(tmp_path, 3000))
    monkeypatch.setattr("llmshrink.distill.data.load_texts", lambda spec: pytest.fail("loaded all in memory"))
    seen = spy_load_dataset(monkeypatch)
    spec = DataSpec(source=src, streaming=True, max_tokens=300, heldout=0.2, fraction=0.5, seed=7)
    train = token_ids(spec, tok)
    assert seen["kwargs"][0]["streaming"] is True
    assert train.dtype == torch.long and train.numel() == 300
    # 100 documents (3 tokens each with eos) fill 300 tokens; the one tokenizer batch of 256 training
    # documents that holds them is ~600 rows in, and nothing after it is read.
    assert seen["rows"] < 1000
    held = token_ids(spec, tok, "heldout")
    assert held.numel() == 300
    assert torch.equal(train, token_ids(spec, tok)) and torch.equal(held, token_ids(spec, tok, "heldout"))
    assert not torch.equal(train, token_ids(spec.model_copy(update={"seed": 8}), tok))
    # Each document's part is the documented hash of (seed, index): the first ones of each part, in order.
    train_docs, held_docs = doc_indices(train), doc_indices(held)
    assert not set(train_docs) & set(held_docs)
    parts = [streamed_part(7, i, 0.2, 0.5) for i in range(3000)]
    assert train_docs == [i for i, p in enumerate(parts) if p == "train"][: len(train_docs)]
    assert held_docs == [i for i, p in enumerate(parts) if p == "heldout"][: len(held_docs)]
    assert len(train_docs) == 100 and len(held_docs) == 100


def test_streaming_matches_in_memory_rows_and_txt_lines(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    jsonl = str(write_jsonl(tmp_path, 50))
    # With nothing held out or dropped, a streamed .jsonl gives the in-memory prefix.
    streamed = token_ids(DataSpec(source=jsonl, streaming=True, max_tokens=40), tok)
    assert torch.equal(streamed, token_ids(DataSpec(source=jsonl, max_tokens=40), tok))
    # A streamed .txt document is one non-empty line, where in memory it is a paragraph.
    txt = tmp_path / "lines.txt"
    txt.write_text("the a\nof and\n\n\nto in\n")
    assert load_texts(DataSpec(source=str(txt))) == ["the a\nof and", "to in"]
    assert list(stream_texts(DataSpec(source=str(txt), streaming=True))) == ["the a", "of and", "to in"]
    monkeypatch.setattr("llmshrink.corpus.builtin_text", lambda name, split: "the a\nof\n\nand to\n")
    assert list(stream_texts(DataSpec(source="builtin:shakespeare", streaming=True))) == ["the a\nof", "and to"]


def test_streaming_errors_are_one_line(tmp_path):
    tok = tiny_tokenizer()
    src = str(write_jsonl(tmp_path, 5))
    with pytest.raises(LlmshrinkError) as err:
        token_ids(DataSpec(source=src, streaming=True), tok)
    assert str(err.value) == (
        "data.streaming needs data.max_tokens: set data.max_tokens to bound how much text is read, "
        "or set data.streaming to false"
    )
    with pytest.raises(LlmshrinkError) as err:
        token_ids(DataSpec(source=src, streaming=True, max_tokens=9, text_field="body"), tok)
    assert str(err.value) == f"data.text_field: {src} has no field 'body'; fields: text, i"
    # Seed 1 holds out all 5 documents at heldout 0.9; the whole file was read to find that out.
    assert [streamed_part(1, i, 0.9, 1.0) for i in range(5)] == ["heldout"] * 5
    with pytest.raises(LlmshrinkError) as err:
        token_ids(DataSpec(source=src, streaming=True, max_tokens=9, heldout=0.9, seed=1), tok)
    assert str(err.value) == (
        f"data: no document of {src} fell in the train part (data.seed=1, data.fraction=1.0, "
        "data.heldout=0.9): use more text or change these"
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "the a"}\n{not json\n')
    with pytest.raises(LlmshrinkError, match=f"^data.source: cannot read {broken}: "):
        token_ids(DataSpec(source=str(broken), streaming=True, max_tokens=9), tok)


def test_template_builds_each_document_from_the_record_fields(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"dialogue": "Ann: hi\nBob: hello", "summary": "They greet."}, {"dialogue": "Cy: bye", "summary": "Cy leaves."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = "Summarize the dialogue.\n{dialogue}\nSummary: {summary}"
    expected = ["Summarize the dialogue.\nAnn: hi\nBob: hello\nSummary: They greet.",
                "Summarize the dialogue.\nCy: bye\nSummary: Cy leaves."]
    assert load_texts(DataSpec(source=str(path), template=template)) == expected
    assert list(stream_texts(DataSpec(source=str(path), template=template, streaming=True))) == expected
    for streaming in (False, True):
        spec = DataSpec(source=str(path), template="{dialogue} -> {title}", streaming=streaming)
        with pytest.raises(LlmshrinkError) as err:
            list(stream_texts(spec)) if streaming else load_texts(spec)
        assert str(err.value) == f"data.template: record 0 of {path} has no field 'title'; fields: dialogue, summary"
