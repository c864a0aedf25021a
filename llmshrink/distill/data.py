"""Training text: load documents from a DataSpec, hold some out, cut the rest down, tokenize, pack.

What a "document" is (empty ones are always dropped):
- in memory (default): one row of a dataset or .jsonl/.json/.parquet file, or one blank-line-separated
  paragraph of a plain text (built-in corpora and .txt files; one line, when the text has no blank lines).
- streaming: the same, except that a .txt document is one line (finding paragraphs, or learning that there
  are none, could mean reading the whole file first).

Which documents each part gets, deterministic in `seed`:
- in memory: one seeded shuffle of all n documents; its first max(1, round(n*heldout)) are held out
  (none when heldout == 0; kept in source order), and of the rest the next max(1, floor(n_train*fraction)) train when
  fraction < 1, or all of them in source order when fraction == 1.
- streaming: document number i (counting non-empty ones) draws u = hash(seed, i) in [0, 1); it is held
  out if u < heldout, and trains if (u - heldout)/(1 - heldout) < fraction. One pass decides each document
  alone, so reading stops as soon as max_tokens are in hand and the corpus is never held in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import string
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Literal

import torch

from llmshrink.errors import LlmshrinkError, did_you_mean, first_line
from llmshrink.specs import DataSpec

Part = Literal["train", "heldout"]

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_TOKENIZE_CHUNK = 256  # documents per tokenizer call; lets max_tokens stop early on big corpora


def load_texts(spec: DataSpec) -> list[str]:
    """The non-empty documents of `spec.source`, in source order, all in memory."""
    source = spec.source
    if source.startswith("builtin:"):
        docs = _builtin_paragraphs(spec)
    elif (path := _local_path(spec)) is None:
        docs = _column(_load_hub(spec), spec, source)
    elif path.suffix.lower() == ".txt":
        docs = _paragraphs(path.read_text(encoding="utf-8", errors="replace"))
    else:
        docs = _column(_load_local(path, _LOCAL_BUILDERS[path.suffix.lower()]), spec, source)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LlmshrinkError(f"data.source: {source}: no text found")
    return docs


def stream_texts(spec: DataSpec) -> Iterator[str]:
    """The non-empty documents of `spec.source`, in source order, read lazily one by one."""
    source = spec.source
    if source.startswith("builtin:"):
        docs: Iterable[str] = _builtin_paragraphs(spec)  # small and shipped in the package
    elif (path := _local_path(spec)) is None:
        docs = _rows(_load_hub(spec, streaming=True), spec, spec.text_field, source, lambda err: _hub_error(spec, err))
    else:
        suffix = path.suffix.lower()
        # The text builder yields one row per line; "replace" reads bad bytes as load_texts does.
        extra = {"encoding_errors": "replace"} if suffix == ".txt" else {}
        dataset = _load_local(path, _LOCAL_BUILDERS[suffix], streaming=True, **extra)
        field = "text" if suffix == ".txt" else spec.text_field
        docs = _rows(dataset, spec, field, source, lambda err: _read_error(path, err))
    empty = True
    for doc in docs:
        if doc.strip():
            empty = False
            yield doc
    if empty:
        raise LlmshrinkError(f"data.source: {source}: no text found")


def token_ids(spec: DataSpec, tokenizer, part: Part = "train") -> torch.Tensor:
    """1-D token ids of one part of the documents, tokenized, eos-joined and cut to max_tokens.

    `part` is "train" (what `fraction` keeps of the documents not held out) or "heldout" (the documents
    `spec.heldout` sets aside). Which documents: see the module docstring. No special tokens are added per
    document; the tokenizer's eos id (if any) separates documents.
    """
    if part not in ("train", "heldout"):
        raise ValueError(f"part: expected 'train' or 'heldout', got {part!r}")
    if part == "heldout" and spec.heldout == 0:
        raise LlmshrinkError(
            f"data.heldout is {spec.heldout}, so no text is held out: set data.heldout to a fraction in (0, 1), "
            "e.g. 0.05, to keep that share of the documents out of training"
        )
    if spec.streaming:
        if spec.max_tokens is None:
            raise LlmshrinkError(
                "data.streaming needs data.max_tokens: set data.max_tokens to bound how much text is read, "
                "or set data.streaming to false"
            )
        docs: Iterable[str] = _streamed_part(spec, part)
    else:
        docs = _in_memory_part(spec, part)
    return _encode(docs, tokenizer, spec.max_tokens)


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


def _in_memory_part(spec: DataSpec, part: Part) -> list[str]:
    docs = load_texts(spec)
    order = list(range(len(docs)))
    random.Random(spec.seed).shuffle(order)
    held = max(1, round(len(docs) * spec.heldout)) if spec.heldout > 0 else 0
    if held >= len(docs):
        raise LlmshrinkError(
            f"data.heldout: {spec.heldout} holds out all {len(docs)} documents of {spec.source}, "
            "leaving none for training: lower data.heldout or use more text"
        )
    if part == "heldout":
        return [docs[i] for i in sorted(order[:held])]
    rest = order[held:]
    # With heldout == 0 this is the shuffle that selected training documents before held-out splits existed.
    chosen = rest[: max(1, int(len(rest) * spec.fraction))] if spec.fraction < 1.0 else sorted(rest)
    return [docs[i] for i in chosen]


def _streamed_part(spec: DataSpec, part: Part) -> Iterator[str]:
    found = False
    for index, doc in enumerate(stream_texts(spec)):
        if _part_of(spec, index) == part:
            found = True
            yield doc
    if not found:  # reached only when the whole source was read without a match
        raise LlmshrinkError(
            f"data: no document of {spec.source} fell in the {part} part (data.seed={spec.seed}, "
            f"data.fraction={spec.fraction}, data.heldout={spec.heldout}): use more text or change these"
        )


def _part_of(spec: DataSpec, index: int) -> Part | None:
    """Where streamed document `index` goes, from a hash of (seed, index) alone: no state across documents."""
    digest = hashlib.blake2b(f"{spec.seed}:{index}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < spec.heldout:
        return "heldout"
    return "train" if (u - spec.heldout) / (1.0 - spec.heldout) < spec.fraction else None


def _encode(docs: Iterable[str], tokenizer, limit: int | None) -> torch.Tensor:
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    stream = iter(docs)
    while chunk := list(islice(stream, _TOKENIZE_CHUNK)):
        # Whole documents on purpose (cut into windows later): verbose=False drops transformers' warning that
        # they exceed the model's maximum length, which would be about a forward that never happens.
        for doc_ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            if ids and eos is not None:
                ids.append(eos)
            ids.extend(doc_ids)
        if limit is not None and len(ids) >= limit:
            break  # a streamed source is read no further
    if limit is not None:
        ids = ids[:limit]
    return torch.tensor(ids, dtype=torch.long)


def _builtin_paragraphs(spec: DataSpec) -> list[str]:
    from llmshrink.corpus import builtin_text

    return _paragraphs(builtin_text(spec.source.removeprefix("builtin:"), spec.split))


def _local_path(spec: DataSpec) -> Path | None:
    """The local file `spec.source` names, or None for a hub id; errors for a missing or unusable file."""
    path = Path(spec.source).expanduser()
    suffix = path.suffix.lower()
    if suffix in _LOCAL_BUILDERS:
        if not path.is_file():
            raise LlmshrinkError(f"data.source: file not found: {spec.source}")
        return path
    if path.exists():
        raise LlmshrinkError(
            f"data.source: {spec.source}: unsupported file type {suffix or '(none)'!r}; "
            "use .txt, .jsonl, .json or .parquet"
        )
    return None


def _paragraphs(text: str) -> list[str]:
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    # A text without blank lines would be one document, and `fraction` could not subsample it.
    return paragraphs if len(paragraphs) > 1 else text.splitlines()


def _load_local(path: Path, builder: str, streaming: bool = False, **config):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train",
                                     streaming=streaming, **config)
    except Exception as err:  # datasets raises many types for malformed files
        raise _read_error(path, err) from err


def _load_hub(spec: DataSpec, streaming: bool = False):
    import datasets

    try:
        return datasets.load_dataset(spec.source, spec.config, split=spec.split, streaming=streaming)
    except Exception as err:  # no network, unknown id, unknown config or split
        raise _hub_error(spec, err) from err


def _read_error(path: Path, err: Exception) -> LlmshrinkError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LlmshrinkError(f"data.source: cannot read {path}: {first}")


def _hub_error(spec: DataSpec, err: BaseException) -> LlmshrinkError:
    """Tell apart, from what datasets raised: no network, no such dataset, a wrong config or split."""
    from datasets.exceptions import DatasetNotFoundError

    name, chain = spec.source, list(_chain(err))
    missing = next((e for e in chain if isinstance(e, DatasetNotFoundError)), None)
    if missing is not None:
        first = str(missing).strip().splitlines()[0]
        return LlmshrinkError(f"data.source: {first} (a typo? a private or gated dataset needs `hf auth login`)")
    if any(isinstance(e, (ConnectionError, TimeoutError)) or {c.__name__ for c in type(e).__mro__} & _NETWORK_ERRORS
           for e in chain):
        return LlmshrinkError(
            f"data.source: cannot load dataset {name!r} (offline?): use a local .txt/.jsonl file or builtin:shakespeare"
        )
    text = str(next((e for e in chain if isinstance(e, ValueError)), ""))
    if text.startswith("Config name is missing"):
        return LlmshrinkError(f"data.config: not given, and dataset {name!r} has several; pick one of: {_listed(text)}")
    if text.startswith("BuilderConfig"):
        known = _listed(text, "Available: ")
        hint = did_you_mean(str(spec.config), known.split(", "))
        return LlmshrinkError(f"data.config: {spec.config!r} is not a config of dataset {name!r}{hint}; "
                              f"available: {known}")
    if text.startswith("Unknown split"):
        known = _listed(text, "Should be one of ")
        return LlmshrinkError(f"data.split: {spec.split!r} is not a split of dataset {name!r}"
                              f"{did_you_mean(spec.split, known.split(', '))}; available: {known}")
    return LlmshrinkError(f"data.source: cannot load dataset {name!r}: {first_line(err)}")


# Network failures that are not builtin ConnectionErrors (httpx, requests, huggingface_hub's cache miss).
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "TransportError", "OfflineModeIsEnabled",
                   "LocalEntryNotFoundError"}


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """err, then what it was raised from (or while handling), and so on."""
    seen = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


def _listed(text: str, after: str = "configs: ", show: int = 12) -> str:
    """'a, b' from a datasets message that ends its sentence with a Python list: "... configs: ['a', 'b']"."""
    import ast

    start = text.find("[", text.find(after))
    end = text.find("]", start)
    try:
        names = [str(n) for n in ast.literal_eval(text[start:end + 1])]
    except (ValueError, SyntaxError):
        return text[start:end + 1] or "(not listed)"
    more = f", ... ({len(names)} in all)" if len(names) > show else ""
    return ", ".join(names[:show]) + more


def _no_field(field: str, source: str, columns: Iterable[str]) -> LlmshrinkError:
    return LlmshrinkError(
        f"data.text_field: {source} has no field {field!r}; fields: {', '.join(columns) or '(none)'}"
    )


def _column(dataset, spec: DataSpec, source: str) -> list[str]:
    if spec.template is not None:
        return [text for i, row in enumerate(dataset)
                if (text := _text_of(row, spec.text_field, spec.template, source, i))]
    columns = list(dataset.column_names)
    if spec.text_field not in columns:
        raise _no_field(spec.text_field, source, columns)
    return [t for t in dataset[spec.text_field] if isinstance(t, str)]


def _rows(dataset, spec: DataSpec, field: str, source: str,
          error: Callable[[Exception], LlmshrinkError]) -> Iterator[str]:
    """The documents of a streamed dataset, row by row: `field`'s string value, or the filled template."""
    rows = iter(dataset)
    for index in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as err:  # a streamed file is parsed, and a hub read, only while iterating
            raise error(err) from err
        text = _text_of(row, field, spec.template, source, index)
        if text is not None:
            yield text


def _text_of(row: dict, field: str, template: str | None, source: str, index: int = 0) -> str | None:
    """One record (`index` counts from 0) as a document: the template filled with its fields, else its text field."""
    if template is None:
        if field not in row:
            raise _no_field(field, source, row)
        return row[field] if isinstance(row[field], str) else None
    try:
        text = template.format_map(row)
    except KeyError as err:
        raise LlmshrinkError(
            f"data.template: record {index} of {source} has no field {err.args[0]!r}; "
            f"fields: {', '.join(row) or '(none)'}"
        ) from None
    except (IndexError, ValueError, AttributeError, TypeError) as err:  # recipe validation allows only {name}
        raise LlmshrinkError(f"data.template: record {index} of {source}: cannot fill {template!r}: {err}") from None
    # datasets fills a field that some records lack with None: without this, "None" would be trained on.
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and row.get(name.split(".")[0].split("[")[0]) is None:
            raise LlmshrinkError(f"data.template: record {index} of {source}: field {name!r} is empty (null); "
                                 "fill it in, or leave the record out of the file")
    return text
