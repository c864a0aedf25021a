"""Built-in text that ships inside the package, so training and evaluation work offline.

Provenance and license of each file: llmshrink/data/README.md.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from llmshrink.errors import LlmshrinkError, did_you_mean

# name -> split -> file under llmshrink/data/
BUILTIN_CORPORA: dict[str, dict[str, str]] = {
    "shakespeare": {"train": "shakespeare_train.txt", "test": "shakespeare_test.txt"},
    # Out-of-domain evaluation only: modern expository English (Python 3.11 tutorial, HOWTOs, FAQ prose).
    "python_docs": {"test": "python_docs_test.txt"},
}
# Recipes and datasets name the held-out split differently; both mean the held-out text here.
SPLIT_ALIASES: dict[str, str] = {"validation": "test"}


def builtin_text(name: str, split: str) -> str:
    """The whole text of built-in corpus `name` (with or without `builtin:`) for `split`."""
    name = name.removeprefix("builtin:")
    splits = BUILTIN_CORPORA.get(name)
    if splits is None:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_CORPORA)
        hint = did_you_mean(name, BUILTIN_CORPORA, prefix="builtin:")
        raise LlmshrinkError(f"data.source: unknown built-in corpus 'builtin:{name}'{hint}; known: {known}")
    key = SPLIT_ALIASES.get(split, split)
    if key not in splits:
        allowed = ", ".join([*splits, *SPLIT_ALIASES])
        raise LlmshrinkError(f"data.split: builtin:{name} has no split '{split}'; allowed: {allowed}")
    return _read(splits[key])


@lru_cache(maxsize=8)
def _read(filename: str) -> str:
    return resources.files("llmshrink").joinpath("data", filename).read_text(encoding="utf-8")
