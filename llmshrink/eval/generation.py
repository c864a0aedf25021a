"""Generation quality: greedy outputs of a model scored against references with ROUGE, BLEU, METEOR.

Every score is on a 0-100 scale (sacrebleu's convention), so ROUGE, BLEU and METEOR sit side by side
in a report. A reference may be one string or a list of strings (several references per prediction).

- ROUGE (rouge_score, Porter stemmer on): rouge1 / rouge2 / rougeL F-measure, averaged over samples.
  With several references a sample takes its best-scoring reference, per metric. rougeLsum is not
  reported: it splits texts at newlines, and predictions here are single lines (generation stops at
  the first newline), so it would only repeat rougeL.
- BLEU (sacrebleu): corpus BLEU, default settings (13a tokenizer, exponential smoothing, cased).
- METEOR (nltk): mean of the sentence scores; its synonym stage needs the WordNet corpus, which nltk
  cannot download offline, so it is computed only when asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.perplexity import max_positions
from llmshrink.eval.specs import (  # noqa: F401  (re-exported: their home is eval.specs)
    BUILTIN_GENERATION_DATA,
    DATA_TO_TEXT_PROMPT,
    EVALS_DATA,
    FIELD,
    SUMMARY_PROMPT,
    GenerationSpec,
    GenerationTask,
    resolve_task,
)

Reference = str | Sequence[str]
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


# --- metrics ---------------------------------------------------------------------------------------

def _references(predictions: Sequence[str], references: Sequence[Reference], metric: str) -> list[list[str]]:
    """Every reference as a non-empty list of strings, one entry per prediction."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise LlmshrinkError(f"{metric}: predictions and references must be lists of strings, not one string")
    if len(predictions) != len(references):
        raise LlmshrinkError(
            f"{metric}: {len(predictions)} predictions but {len(references)} references; need one per prediction"
        )
    if not predictions:
        raise LlmshrinkError(f"{metric}: no predictions to score; need at least one")
    out = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise LlmshrinkError(
                f"{metric}: reference {i} is {ref!r}; allowed: a string or a non-empty list of strings"
            )
        out.append(refs)
    return out


def rouge(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0-100), stemmed; the best reference per sample and metric."""
    from rouge_score import rouge_scorer

    refs = _references(predictions, references, "rouge")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, targets in zip(predictions, refs, strict=True):
        scores = scorer.score_multi(targets, pred)
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(refs) for key, total in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults; predictions may have different numbers of references."""
    from sacrebleu.metrics import BLEU

    refs = _references(predictions, references, "bleu")
    # sacrebleu wants one stream per reference slot; None marks "this prediction has no k-th reference".
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(max(map(len, refs)))]
    return float(BLEU().corpus_score(list(predictions), streams).score)


def load_wordnet():
    """nltk's WordNet reader, or LlmshrinkError saying where nltk looked and how to provide the corpus."""
    import nltk

    try:
        nltk.data.find("corpora/wordnet")  # also finds corpora/wordnet.zip, as nltk's downloader installs it
    except LookupError:
        where = ", ".join(str(p) for p in nltk.data.path)
        env = os.environ.get("NLTK_DATA", "unset")
        raise LlmshrinkError(
            f"METEOR needs the WordNet corpus, which nltk did not find as corpora/wordnet under nltk.data.path "
            f"[{where}] (NLTK_DATA={env}); provide it with `python -m nltk.downloader wordnet` on a networked "
            f"machine and copy the nltk_data folder here, or copy Debian's wordnet-base dict files into "
            f"$NLTK_DATA/corpora/wordnet, or leave meteor out of metrics"
        ) from None
    from nltk.corpus import wordnet

    return wordnet


def meteor(predictions: Sequence[str], references: Sequence[Reference], wordnet: Any = None) -> float:
    """Mean METEOR (0-100) of nltk's meteor_score; `wordnet` is any object with nltk's synsets(word) API.

    Texts are lower-cased and split with nltk's Treebank-style word tokenizer (which, unlike
    word_tokenize, needs no punkt data). With several references a sample takes its best one.
    """
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.translate.meteor_score import meteor_score

    refs = _references(predictions, references, "meteor")
    wordnet = load_wordnet() if wordnet is None else wordnet
    tokenize = NLTKWordTokenizer().tokenize
    total = 0.0
    for pred, targets in zip(predictions, refs, strict=True):
        total += meteor_score([tokenize(r) for r in targets], tokenize(pred), wordnet=wordnet)
    return 100.0 * total / len(refs)


# --- generation ------------------------------------------------------------------------------------

def _first_line(text: str, stop_at_newline: bool) -> str:
    """Stripped text; with stop_at_newline only its first line (leading blank lines do not count)."""
    text = text.strip()
    return text.split("\n", 1)[0].strip() if stop_at_newline else text


class _StopAtNewline:
    """Stopping criterion: a row is done once its new text (after leading whitespace) holds a newline.

    Saves generating up to max_new_tokens past the line that is kept anyway.
    """

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_width:]
        done = ["\n" in self.tokenizer.decode(row, skip_special_tokens=True).lstrip() for row in new.tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _greedy_config(model: nn.Module, tokenizer, max_new_tokens: int, pad_id: int):
    """A fresh greedy GenerationConfig: the model's own sampling settings must not leak in."""
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=pad_id, eos_token_id=eos)


def _encode(tokenizer, prompts: Sequence[str], room: int | None) -> tuple[list[list[int]], int]:
    """Token ids per prompt, over-long prompts cut from the left (the instruction cue is at the end)."""
    encoded, truncated = [], 0
    for i, prompt in enumerate(prompts):
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids:
            raise LlmshrinkError(f"generation: prompt {i} ({prompt!r}) has no tokens; give a non-empty prompt")
        if room is not None and len(ids) > room:
            ids, truncated = ids[-room:], truncated + 1
        encoded.append(ids)
    return encoded, truncated


def _generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
              stop_at_newline: bool, device: torch.device | str | None, progress: bool) -> tuple[list[str], int]:
    """(texts, number of prompts cut to fit the model's positions); see generate_texts."""
    if isinstance(prompts, str):
        raise LlmshrinkError("generation: prompts must be a list of strings, not one string")
    if max_new_tokens < 1 or batch_size < 1:
        raise LlmshrinkError(
            f"generation: max_new_tokens={max_new_tokens}, batch_size={batch_size}; both must be >= 1"
        )
    # Pad ids are set here, never on the tokenizer: the caller's tokenizer stays exactly as it was.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise LlmshrinkError("generation: the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    limit = max_positions(model)
    room = None if limit is None else limit - max_new_tokens
    if room is not None and room < 1:
        raise LlmshrinkError(
            f"generation: max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"{limit} positions; use max_new_tokens < {limit}"
        )
    encoded, truncated = _encode(tokenizer, prompts, room)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    config = _greedy_config(model, tokenizer, max_new_tokens, pad_id)
    # Batches of similar length waste less compute on padding; results go back in prompt order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()  # dropout would make greedy decoding random
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # LEFT padding: every row's last prompt token is at the same column
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            stop = [_StopAtNewline(tokenizer, width)] if stop_at_newline else []
            with torch.inference_mode():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config, stopping_criteria=stop)
            for r, i in enumerate(rows):
                new = out[r, width:].tolist()
                texts[i] = _first_line(tokenizer.decode(new, skip_special_tokens=True), stop_at_newline)
    finally:
        model.train(was_training)
    return texts, truncated


def generate_texts(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
                   batch_size: int = 8, stop_at_newline: bool = True, device: torch.device | str | None = None,
                   progress: bool = True) -> list[str]:
    """Greedy continuation of each prompt: only the new text, stripped, cut at its first newline if asked.

    Prompts are batched with left padding (pad id: the tokenizer's pad token, else its eos token), so a
    prompt gets the same text whatever the batch size. A prompt longer than the model's positions minus
    max_new_tokens keeps its last tokens. `device`: where the inputs go (default: the model's device).
    """
    texts, _ = _generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop_at_newline, device, progress)
    return texts


# --- recipe section and end-to-end evaluation ------------------------------------------------------

def read_pairs(path: Path, input_field: str, target_field: str) -> list[tuple[str, Reference]]:
    """(input, reference) per jsonl record; any bad line -> LlmshrinkError naming file, line and field."""
    pairs: list[tuple[str, Reference]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LlmshrinkError(f"{path}:{lineno}: not valid JSON ({err.msg}); need one object per line") from None
            if not isinstance(record, dict):
                raise LlmshrinkError(f"{path}:{lineno}: a {type(record).__name__}, not a JSON object")
            for role, name in (("input_field", input_field), ("target_field", target_field)):
                if name not in record:
                    fields = ", ".join(sorted(record)) or "none"
                    raise LlmshrinkError(
                        f"{path}:{lineno}: no field '{name}' ({FIELD}.{role}); fields there: {fields}"
                    )
            source, target = record[input_field], record[target_field]
            if not isinstance(source, str):
                raise LlmshrinkError(f"{path}:{lineno}: field '{input_field}' is {source!r}; need a string")
            ok_list = isinstance(target, list) and target and all(isinstance(t, str) for t in target)
            if not (isinstance(target, str) or ok_list):
                raise LlmshrinkError(
                    f"{path}:{lineno}: field '{target_field}' is {target!r}; need a string or a list of strings"
                )
            pairs.append((source, target))
    if not pairs:
        raise LlmshrinkError(f"{path}: no records; need at least one JSON object per line")
    return pairs


def evaluate_generation(model: nn.Module, tokenizer, spec: GenerationSpec,
                        device: torch.device | str | None = None, progress: bool = True) -> dict:
    """Generate for every record of spec.data and score: metrics (0-100), samples, examples, protocol.

    Returns {"rouge1", "rouge2", "rougeL" (with rouge), "bleu", "meteor" (when listed), "samples",
    "prompts_truncated", "data", "examples": first 3 {prompt, prediction, reference}}.
    """
    task = spec.resolve()
    wordnet = load_wordnet() if "meteor" in spec.metrics else None  # fail before spending time generating
    pairs = read_pairs(task.path, task.input_field, task.target_field)[: spec.limit]
    prompts = [task.prompt.replace("{input}", source) for source, _ in pairs]
    references = [target for _, target in pairs]
    predictions, truncated = _generate(model, tokenizer, prompts, spec.max_new_tokens, spec.batch_size,
                                       spec.stop_at_newline, device, progress)
    result: dict[str, Any] = {}
    if "rouge" in spec.metrics:
        result.update(rouge(predictions, references))
    if "bleu" in spec.metrics:
        result["bleu"] = bleu(predictions, references)
    if "meteor" in spec.metrics:
        result["meteor"] = meteor(predictions, references, wordnet=wordnet)
    result.update(
        samples=len(pairs),
        prompts_truncated=truncated,
        data=str(task.path),
        examples=[{"prompt": p, "prediction": y, "reference": r}
                  for p, y, r in list(zip(prompts, predictions, references, strict=True))[:3]],
    )
    return result
