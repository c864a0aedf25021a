"""Training text: load documents from a DataSpec, cut them down deterministically, tokenize, pack.

A "document" is one row of a dataset or JSON file, or one blank-line-separated paragraph of a plain
text (built-in corpora and .txt files; one line, when the text has no blank lines), so that
`fraction` can pick a seeded subset of them.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from llmshrink.errors import LlmshrinkError
from llmshrink.specs import DataSpec

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TOKENIZE_CHUNK = 256  # documents per tokenizer call; lets max_tokens stop early on big corpora


def load_texts(spec: DataSpec) -> list[str]:
    """The non-empty documents of `spec.source`, in source order."""
    source = spec.source
    if source.startswith("builtin:"):
        from llmshrink.corpus import builtin_text

        docs = _paragraphs(builtin_text(source.removeprefix("builtin:"), spec.split))
    else:
        path = Path(source).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".txt" or suffix in _LOCAL_BUILDERS:
            if not path.is_file():
                raise LlmshrinkError(f"data.source: file not found: {source}")
            if suffix == ".txt":
                docs = _paragraphs(path.read_text(encoding="utf-8", errors="replace"))
            else:
                docs = _column(_load_local(path, _LOCAL_BUILDERS[suffix]), spec, source)
        elif path.exists():
            raise LlmshrinkError(
                f"data.source: {source}: unsupported file type {suffix or '(none)'!r}; "
                "use .txt, .jsonl, .json or .parquet"
            )
        else:
            docs = _column(_load_hub(spec), spec, source)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LlmshrinkError(f"data.source: {source}: no text found")
    return docs


def token_ids(spec: DataSpec, tokenizer) -> torch.Tensor:
    """1-D token ids: `fraction` of the documents (seeded), tokenized, eos-joined, cut to max_tokens.

    With fraction < 1 the documents are shuffled by `spec.seed` and the first max(1, floor(n*fraction)) kept;
    with fraction == 1 they stay in source order. No special tokens are added per document; the
    tokenizer's eos id (if any) separates documents.
    """
    docs = load_texts(spec)
    if spec.fraction < 1.0:
        keep = max(1, int(len(docs) * spec.fraction))
        order = list(range(len(docs)))
        random.Random(spec.seed).shuffle(order)
        docs = [docs[i] for i in order[:keep]]
    eos = getattr(tokenizer, "eos_token_id", None)
    limit = spec.max_tokens
    ids: list[int] = []
    for start in range(0, len(docs), _TOKENIZE_CHUNK):
        chunk = docs[start : start + _TOKENIZE_CHUNK]
        for doc_ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            if ids and eos is not None:
                ids.append(eos)
            ids.extend(doc_ids)
        if limit is not None and len(ids) >= limit:
            break
    if limit is not None:
        ids = ids[:limit]
    return torch.tensor(ids, dtype=torch.long)


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(num_blocks, seq_len) consecutive blocks of `ids`; the remainder that fills no block is dropped."""
    if seq_len < 1:
        raise LlmshrinkError(f"seq_len: expected int >= 1, got {seq_len}")
    blocks = ids.numel() // seq_len
    if blocks == 0:
        raise LlmshrinkError(
            f"data: {ids.numel()} tokens of training text is less than one block of seq_len={seq_len}: "
            "lower seq_len or raise data.fraction / data.max_tokens"
        )
    return ids[: blocks * seq_len].reshape(blocks, seq_len).long()


def _paragraphs(text: str) -> list[str]:
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    # A text without blank lines would be one document, and `fraction` could not subsample it.
    return paragraphs if len(paragraphs) > 1 else text.splitlines()


def _load_local(path: Path, builder: str):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    except Exception as err:  # datasets raises many types for malformed files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LlmshrinkError(f"data.source: cannot read {path}: {first}") from err


def _load_hub(spec: DataSpec):
    import datasets

    try:
        return datasets.load_dataset(spec.source, spec.config, split=spec.split)
    except Exception as err:  # no network, unknown id, unknown config or split
        raise LlmshrinkError(
            f"data.source: cannot load dataset {spec.source!r} (offline?): "
            "use a local .txt/.jsonl file or builtin:shakespeare"
        ) from err


def _column(dataset, spec: DataSpec, source: str) -> list[str]:
    columns = list(dataset.column_names)
    if spec.text_field not in columns:
        raise LlmshrinkError(
            f"data.text_field: {source} has no field {spec.text_field!r}; "
            f"fields: {', '.join(columns) or '(none)'}"
        )
    return [t for t in dataset[spec.text_field] if isinstance(t, str)]
