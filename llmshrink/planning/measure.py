"""Measure each candidate decision alone: take it on a copy of the base, then its exact size and calibration loss.

Size is counted on the model itself (unique parameters, the checkpoint's tensor bytes, MACs of one forward over
MACS_SEQ_LEN tokens and of one decode step after them), so a plan's accounting is the model's, not an estimate.
Loss, over calibration windows spread evenly across the training text (a mix's corpus and its teacher samples
alike), is by the search's `score`:
- kl (default): the mean KL(base || model) per token, nats: how far the decision moves the model from the base
  on every next token, whatever the text. It is what recovery distils back toward, and it does not reward
  keeping what only the calibration text needs (NLL does: in benchmarks/target.py its plans were 4-6% worse
  out of domain than dropping blocks at 0.8x / 0.9x params, the KL plans 1-2% better).
- nll: the mean next-token NLL (nats) of the calibration text itself.
Measurements are cached in a JSON file per (base model, training text, calibration size, score, llmshrink
version and source code), saved after every decision: planning again for another budget measures nothing, and
an interrupted measurement resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.macs import macs_per_decode_token, macs_per_token
from llmshrink.eval.perplexity import max_positions, perplexity, window_logits
from llmshrink.eval.size import count_bytes, count_params
from llmshrink.eval.task_eval import evaluating
from llmshrink.fileio import atomic_write_text
from llmshrink.planning.candidates import Candidate
from llmshrink.planning.spec import MACS_SEQ_LEN
from llmshrink.registry import get_pass
from llmshrink.version import __version__

WINDOW = 512  # calibration window (shorter where the model's positions are)


@dataclass(frozen=True)
class Measured:
    loss: float  # mean NLL per token on the calibration windows
    params: int
    bytes: int
    macs: int  # of one forward over MACS_SEQ_LEN tokens
    decode_macs: int  # of one decode step: a token after decode_context() cached ones

    def size(self, kind: str) -> int:
        return getattr(self, kind)


def calibration_window(model: nn.Module) -> int:
    """WINDOW, or the model's positions where it has fewer."""
    return min(WINDOW, max_positions(model) or WINDOW)


def decode_context(model: nn.Module) -> int:
    """The cached tokens a counted decode step follows: MACS_SEQ_LEN, or fewer where the model's positions end."""
    return min(MACS_SEQ_LEN, (max_positions(model) or MACS_SEQ_LEN + 1) - 1)


def calibration_ids(ctx: Context, tokens: int, window: int) -> torch.Tensor:
    """`tokens` tokens of the training text as whole windows spread evenly over it, one after another."""
    ids = ctx.train_token_ids()
    count = max(1, min(tokens, ids.numel()) // window)
    if ids.numel() < window:
        return ids
    starts = torch.linspace(0, ids.numel() - window, count).long().tolist()
    return torch.cat([ids[s:s + window] for s in starts])


def _window_log_probs(model: nn.Module, ids: torch.Tensor, window: int, device: torch.device):
    """Log-probabilities over the vocabulary at every position, window by window (float32, on the CPU), in eval
    mode without gradients (the model's own mode back afterwards)."""
    with evaluating(model):
        for start in range(0, ids.numel(), window):
            logits = window_logits(model, ids[start:start + window][None].to(device))[0]
            yield torch.log_softmax(logits.float(), dim=-1).cpu()


def reference_log_probs(model: nn.Module, ids: torch.Tensor, window: int, device: torch.device) -> torch.Tensor:
    """The base's log-probabilities on the calibration tokens (tokens x vocab): what KL scores compare against."""
    return torch.cat(list(_window_log_probs(model, ids, window, device)))


def mean_kl(model: nn.Module, ids: torch.Tensor, window: int, device: torch.device, reference: torch.Tensor) -> float:
    """Mean over tokens of KL(reference || model), nats."""
    total, start = 0.0, 0
    for log_q in _window_log_probs(model, ids, window, device):
        log_p = reference[start:start + log_q.shape[0]]
        total += float((log_p.exp() * (log_p - log_q)).sum())
        start += log_q.shape[0]
    return total / start


def measure(model: nn.Module, ids: torch.Tensor, window: int, device: torch.device,
            reference: torch.Tensor | None = None) -> Measured:
    """`model`'s exact size and its loss: KL from `reference` (the base's log-probabilities) or, without one, NLL."""
    if reference is not None:
        loss = mean_kl(model, ids, window, device, reference)
    else:
        loss = perplexity(model, ids, window, window, device=device, progress=False).nll
    macs = macs_per_token(model, seq_len=MACS_SEQ_LEN)["total"] * MACS_SEQ_LEN
    decode_macs = macs_per_decode_token(model, context=decode_context(model))["total"]
    return Measured(loss=loss, params=count_params(model), bytes=count_bytes(model), macs=round(macs),
                    decode_macs=round(decode_macs))


def take(model: nn.Module, candidate: Candidate, ctx: Context) -> nn.Module:
    """A copy of `model` with `candidate`'s stage applied (the pass's log lines left out)."""
    (name, body), = candidate.stage.items()
    spec = get_pass(name)
    changed = copy.deepcopy(model)
    try:
        spec.apply(changed, spec.config_cls.model_validate(body), dataclasses.replace(ctx, log=lambda line: None))
    except LlmshrinkError as err:  # the pass names its own fields, which a target: recipe does not have
        raise LlmshrinkError(f"search: block {candidate.block}, {candidate.label}: {err}; remove it from search:") from err
    return changed


class MeasurementCache:
    """Measurements by candidate key in one JSON file (None: kept in memory only)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path is not None and path.is_file():
            self.entries = json.loads(path.read_text())

    def get(self, key: str) -> Measured | None:
        entry = self.entries.get(key)
        return Measured(**entry) if entry is not None else None

    def put(self, key: str, measured: Measured) -> None:
        self.entries[key] = dataclasses.asdict(measured)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True) + "\n")


def cache_file(root: Path, model: nn.Module, ctx: Context, tokens: int, score: str) -> Path:
    """The cache of one base model (its config and weights' digest), calibration text (the tokens measured on and those the
    passes calibrate on), score and llmshrink's version and source code (a pass changed in a development
    checkout must not be planned with the old pass's measurements)."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    digest.update(config.to_json_string().encode() if hasattr(config, "to_json_string") else b"")
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    window = calibration_window(model)
    for ids in (calibration_ids(ctx, tokens, window), ctx.train_token_ids()[:tokens]):
        digest.update(ids.numpy().tobytes())
    digest.update(f"{tokens} {score} {__version__} {source_digest()}".encode())
    return root / f"{digest.hexdigest()}.json"


@functools.cache
def source_digest() -> str:
    """A digest of llmshrink's own Python sources (what takes and measures the decisions)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


BASE_KEY = "base"


def measure_all(model: nn.Module, candidates: list[Candidate], ctx: Context, ids: torch.Tensor,
                reference: torch.Tensor | None, cache: MeasurementCache,
                log: Callable[[str], None] = print) -> tuple[Measured, dict[str, Measured]]:
    """The base's measurement and each candidate's on calibration tokens `ids` (KL from `reference` where given),
    from the cache where it has them."""
    window = calibration_window(model)
    torch.manual_seed(ctx.seed)
    base = cache.get(BASE_KEY)
    if base is None:
        base = measure(model, ids, window, ctx.device, reference)
        cache.put(BASE_KEY, base)
    todo = [c for c in candidates if cache.get(c.key) is None]
    log(f"  {len(candidates)} decisions on {ids.numel()} calibration tokens: {len(candidates) - len(todo)} "
        f"measured before{f' ({cache.path})' if cache.path and len(todo) < len(candidates) else ''}, "
        f"{len(todo)} to measure")
    for candidate in tqdm(todo, desc="measuring decisions", unit="decision", disable=not todo):
        changed = take(model, candidate, ctx)
        cache.put(candidate.key, measure(changed, ids, window, ctx.device, reference))
        del changed
    return base, {c.key: cache.get(c.key) for c in candidates}
