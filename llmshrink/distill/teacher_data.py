"""Recovery text sampled from the teacher (data-free distillation), cached and resumable.

The samples are generated in batches (left-padded prompts, KV cache, `model.generate`), each batch drawn
under its own seed (the spec's seed and the batch's index), so a batch is the same whether it is generated
in one go, after a restart, or as the prefix of a larger request.

Cache layout, under the run's work folder: `<cache_dir>/<key>/batch-00000.safetensors`, ... one file per batch,
each written atomically, and `settings.json` saying what decided them. `key` hashes those settings (the
teacher's identity, the tokenizer's vocabulary, the sampling spec, but not the token count), so a rerun with
the same settings reads the batches already there and generates only what is missing; a request for more
tokens extends the same samples.
"""

from __future__ import annotations

import hashlib
import json
import random
from itertools import accumulate
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmshrink.errors import LlmshrinkError
from llmshrink.fileio import atomic_write_text
from llmshrink.specs import DataSpec, MixDataSpec, TeacherDataSpec, TeacherSampling

# A document longer than this many characters per prompt token is cut before it is tokenized for its start.
_CHARS_PER_TOKEN = 16


def teacher_token_ids(
    sampling: TeacherSampling,
    tokens: int,
    teacher: nn.Module,
    tokenizer,
    *,
    cache_dir: Path | None = None,
    fingerprint: str = "",
    progress: bool = True,
) -> torch.Tensor:
    """1-D token ids: `tokens` tokens of teacher samples, each sample (prompt included) ended by EOS.

    `fingerprint` names the teacher (e.g. its model spec) in the cache key; without `cache_dir` nothing is cached.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LlmshrinkError("data.source teacher: the tokenizer has no EOS token to end and separate samples")
    prompts = _PromptSource(sampling, tokenizer)
    folder = _cache_folder(cache_dir, sampling, tokenizer, fingerprint)
    ids: list[int] = []
    bar = _progress_bar(tokens, progress)
    try:
        index = 0
        while len(ids) < tokens:
            batch = _read_batch(folder, index)
            if batch is None:
                batch = _generate_batch(teacher, tokenizer, sampling, prompts.batch(index), index)
                _write_batch(folder, index, batch)
            before = len(ids)
            for sample in batch:
                ids += (*sample, eos)
            if bar is not None:
                bar.update(min(len(ids), tokens) - before)
            index += 1
    finally:
        if bar is not None:
            bar.close()
    return torch.tensor(ids[:tokens], dtype=torch.long)


def training_token_ids(data, tokenizer, part: str, teacher: nn.Module | None, *,
                       cache_dir: Path | None = None, fingerprint: str = "") -> torch.Tensor:
    """1-D token ids of the recipe's `data:` section, whichever kind it is: a corpus, teacher samples or a mix.

    A mix is its corpus text, then the teacher samples: the trainer shuffles whole blocks, so each batch mixes
    them, and passes that calibrate on the first tokens (layer selection, importance) read the corpus, as with
    a plain corpus.
    """
    from llmshrink.distill.data import token_ids

    if isinstance(data, DataSpec):
        return token_ids(data, tokenizer, part)
    if part == "heldout":
        if isinstance(data, MixDataSpec) and data.corpus.heldout > 0:
            return token_ids(data.corpus, tokenizer, "heldout")
        raise LlmshrinkError(
            f"data.source {data.source}: teacher samples have no held-out part; set data.corpus.heldout for a mix, "
            "or measure with the recipe's evaluate.perplexity"
        )
    if teacher is None:
        raise LlmshrinkError(f"data.source {data.source}: sampling needs the teacher model, and none was given")
    if isinstance(data, TeacherDataSpec):
        return teacher_token_ids(data, data.tokens, teacher, tokenizer, cache_dir=cache_dir, fingerprint=fingerprint)
    sampled = round(data.tokens * data.teacher_share)
    teacher_ids = teacher_token_ids(data.teacher, sampled, teacher, tokenizer, cache_dir=cache_dir,
                                    fingerprint=fingerprint)
    corpus = data.corpus.model_copy(update={"max_tokens": data.tokens - sampled})
    return torch.cat([token_ids(corpus, tokenizer, "train"), teacher_ids])


class _PromptSource:
    """The prompts of each batch: a seeded shuffle of the prompt documents' starts, taken in turn and cycled."""

    def __init__(self, sampling: TeacherSampling, tokenizer):
        self.sampling, self.tokenizer = sampling, tokenizer
        self.start = _start_token(tokenizer)
        self._docs: list[str] | None = None  # read at the first batch to generate: a cached run never needs them

    @property
    def docs(self) -> list[str]:
        if self._docs is None:
            from llmshrink.distill.data import load_texts

            self._docs = load_texts(self.sampling.prompts)
            random.Random(self.sampling.seed).shuffle(self._docs)
        return self._docs

    def batch(self, index: int) -> list[list[int]]:
        size = self.sampling.batch_size
        if self.sampling.prompts is None:
            return [[self.start]] * size  # the first token is then drawn from the model's own distribution
        keep = self.sampling.prompt_tokens
        picked = [self.docs[(index * size + j) % len(self.docs)] for j in range(size)]
        encoded = self.tokenizer([d[: keep * _CHARS_PER_TOKEN] for d in picked], add_special_tokens=False)
        return [ids[:keep] or [self.start] for ids in encoded["input_ids"]]


@torch.no_grad()
def _generate_batch(teacher: nn.Module, tokenizer, sampling: TeacherSampling, prompts: list[list[int]],
                    index: int) -> list[list[int]]:
    """One batch of samples: each prompt (a lone BOS is dropped) and its new tokens up to, not including, EOS."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(teacher.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the batch's own seed; the caller's RNG is left as it was
        torch.manual_seed(_batch_seed(sampling.seed, index))
        out = teacher.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=0, max_new_tokens=sampling.sample_tokens, pad_token_id=pad,
            eos_token_id=eos, use_cache=True,
        )
    samples = []
    for prompt, row in zip(prompts, out[:, width:].tolist(), strict=True):
        new = row[: row.index(eos)] if eos in row else row
        kept = [] if prompt == [_start_token(tokenizer)] else prompt
        samples.append(kept + new)
    return samples


def _start_token(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _batch_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "big") >> 1


def _cache_folder(cache_dir: Path | None, sampling: TeacherSampling, tokenizer, fingerprint: str) -> Path | None:
    if cache_dir is None:
        return None
    vocab = hashlib.blake2b(json.dumps(sorted(tokenizer.get_vocab().items())).encode(), digest_size=8).hexdigest()
    settings = {"teacher": fingerprint, "vocab": vocab, "eos": tokenizer.eos_token_id,
                "sampling": sampling.model_dump(mode="json", include=set(TeacherSampling.model_fields))}
    text = json.dumps(settings, sort_keys=True)
    folder = Path(cache_dir) / hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    if not (folder / "settings.json").is_file():
        atomic_write_text(folder / "settings.json", text + "\n")
    return folder


def _read_batch(folder: Path | None, index: int) -> list[list[int]] | None:
    path = None if folder is None else folder / f"batch-{index:05d}.safetensors"
    if path is None or not path.is_file():
        return None
    tensors = load_file(str(path))
    flat, lengths = tensors["ids"].tolist(), tensors["lengths"].tolist()
    starts = [0, *accumulate(lengths)][:-1]
    return [flat[s:s + n] for s, n in zip(starts, lengths, strict=True)]


def _write_batch(folder: Path | None, index: int, batch: list[list[int]]) -> None:
    if folder is None:
        return
    path = folder / f"batch-{index:05d}.safetensors"
    tmp = folder / f".{path.name}.tmp"
    tensors = {"ids": torch.tensor([t for s in batch for t in s], dtype=torch.int64),
               "lengths": torch.tensor([len(s) for s in batch], dtype=torch.int64)}
    save_file(tensors, str(tmp))
    tmp.replace(path)  # a killed run leaves whole batches only


def _progress_bar(tokens: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=tokens, desc="teacher samples", unit="tok", unit_scale=True, leave=False)

