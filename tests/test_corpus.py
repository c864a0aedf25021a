"""The out-of-domain built-in corpus `builtin:python_docs` (provenance: llmshrink/data/README.md)."""

from __future__ import annotations

import pytest

from llmshrink.corpus import builtin_text
from llmshrink.distill.data import load_texts
from llmshrink.errors import LlmshrinkError
from llmshrink.recipe import RecipeError, load_recipe
from llmshrink.specs import DataSpec


def test_python_docs_loads_as_plain_prose_paragraphs():
    text = builtin_text("builtin:python_docs", "test")
    assert 200_000 < len(text.encode("utf-8")) < 600_000
    assert builtin_text("python_docs", "validation") == text
    docs = load_texts(DataSpec(source="builtin:python_docs", split="test"))
    assert len(docs) > 1_000
    assert "Python is just the language for you." in docs
    # Plain text: no reST markup, no doctest prompts at a line start, no indented code blocks.
    for marker in ("``", ":func:`", ":ref:`", ".. code-block", ".. note", "`_"):
        assert marker not in text, marker
    lines = text.splitlines()
    assert not [line for line in lines if line.startswith((">>>", "...", " ", "\t"))]
    assert "Permission is hereby granted" not in text and "LICENSE AGREEMENT" not in text


def test_python_docs_shares_no_paragraph_with_shakespeare():
    docs = set(load_texts(DataSpec(source="builtin:python_docs", split="test")))
    for split in ("train", "test"):
        plays = load_texts(DataSpec(source="builtin:shakespeare", split=split))
        assert not docs & set(plays), split


def test_python_docs_has_only_a_test_split():
    with pytest.raises(LlmshrinkError) as err:
        builtin_text("python_docs", "train")
    message = str(err.value)
    assert message == "data.split: builtin:python_docs has no split 'train'; allowed: test, validation"
    assert "\n" not in message


def test_recipe_check_rejects_training_split_of_python_docs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: ood\nmodel: {id: builtin:smollm2-135m}\noutput: {dir: out/ood}\n"
                      "evaluate:\n  perplexity: {data: {source: builtin:python_docs, split: train}}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert str(err.value) == (f"{recipe}: evaluate.perplexity.data.split: builtin:python_docs has no split "
                              "'train'; allowed: test, validation")
