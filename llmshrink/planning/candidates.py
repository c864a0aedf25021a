"""The decisions a `search:` section offers, each one ordinary recipe stage acting on one block of the base.

A block's decisions sit in slots: `block` (remove it whole), `attention` (prune heads, or factorise its layers),
`mlp` (prune FFN neurons, or factorise its layers) and `precision` (store the whole block in another format).
What one block may get is one decision per slot, with these exclusions: removing it excludes the rest, and a
format excludes the structural slots (a format's bytes are measured on the block as the base has it, and
would not add up with a pruned one's). Decisions of different slots touch disjoint tensors, so their savings
add up exactly; their measured losses are added as an estimate (planner.py can re-measure the plan jointly).

The stages are plain pass configs with `layers: [i]`; planner.emit_stages merges equal ones across blocks. One
decision is not a block's (EMBEDDINGS, bytes targets): the embedding tables and the lm_head in int8, which hold a
fifth of a small model's bytes (SmolLM2-135M: 113 of 538 MB in fp32) and which no block format reaches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmshrink.planning.spec import SearchSpec

# Module-name regexes of a block's attention and MLP layers (GPT-2: attn.c_attn, Llama/Gemma: self_attn.q_proj).
ATTENTION_LAYERS = r".*\.(self_attn|attn)\..*"
MLP_LAYERS = r".*\.mlp\..*"
STRUCTURAL_SLOTS = ("attention", "mlp")
EMBEDDINGS = -1  # the `block` of the embeddings decision: a group of its own
# The embedding tables of the supported families (Llama/Gemma embed_tokens, GPT-2 wte/wpe, BERT embeddings.*).
EMBEDDING_TABLES = r".*embed_tokens|.*\.wte|.*\.wpe|.*embeddings\..*"


@dataclass(frozen=True)
class Candidate:
    block: int
    slot: str  # block | attention | mlp | precision
    label: str  # short name in plans and tables, e.g. "prune_ffn 0.5"
    stage: dict[str, Any]  # {pass name: config} that takes this decision alone, on the base's block indices

    @property
    def key(self) -> str:
        """Names the decision in the measurement cache: the stage itself, so a changed setting is measured anew."""
        return json.dumps(self.stage, sort_keys=True)


def make_candidates(blocks: int, search: SearchSpec, kind: str) -> list[Candidate]:
    """Every decision `search` offers for a model of `blocks` blocks, when planning for `kind`."""
    tokens = search.calibration_tokens
    found: list[Candidate] = []
    for i in range(blocks):
        layers = [i]
        if search.drop_layers:
            found.append(Candidate(i, "block", "drop", {"drop_layers": {"layers": layers}}))
        for keep in search.prune_heads:
            found.append(Candidate(i, "attention", f"prune_heads {keep:g}", {"prune_heads": {
                "layers": layers, "keep": keep, "calibration_tokens": tokens}}))
        for keep in search.prune_ffn:
            found.append(Candidate(i, "mlp", f"prune_ffn {keep:g}", {"prune_ffn": {
                "layers": layers, "keep": keep, "calibration_tokens": tokens}}))
        for slot, regex in (("attention", ATTENTION_LAYERS), ("mlp", MLP_LAYERS)):
            for ratio in search.low_rank:
                found.append(Candidate(i, slot, f"low_rank {slot} {ratio:g}", {"low_rank": {
                    "layers": layers, "targets": regex, "ratio": ratio, "activation_aware": True,
                    "calibration_tokens": tokens}}))
        if kind == "bytes":
            for method in search.quantize:
                found.append(Candidate(i, "precision", method, {"quantize": {"method": method, "layers": layers}}))
    if kind == "bytes" and search.embeddings:
        found.append(Candidate(EMBEDDINGS, "precision", "embeddings int8", {"quantize": {
            "method": "int8-dynamic", "targets": "lm_head", "embeddings": True, "embedding_targets": EMBEDDING_TABLES,
            "tied_embeddings": "untie"}}))
    return found


def block_choices(candidates: list[Candidate]) -> list[tuple[Candidate, ...]]:
    """What one block may get (its candidates all): each allowed combination of decisions, as a tuple."""
    by_slot: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_slot.setdefault(candidate.slot, []).append(candidate)
    choices: list[tuple[Candidate, ...]] = [(c,) for c in by_slot.get("block", []) + by_slot.get("precision", [])]
    attention = [None, *by_slot.get("attention", [])]
    mlp = [None, *by_slot.get("mlp", [])]
    for a in attention:
        for m in mlp:
            combo = tuple(c for c in (a, m) if c is not None)
            if combo:
                choices.append(combo)
    return choices


# Emitted stages run in this order: the passes that keep the block count first, so that every `layers:` index is
# still the base's; drop_layers last.
PASS_ORDER = ("prune_heads", "prune_ffn", "low_rank", "quantize", "drop_layers")


def emit_stages(chosen: list[Candidate]) -> list[dict[str, Any]]:
    """The chosen decisions as ordinary stages: one per pass and setting, with the blocks it applies to."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for candidate in chosen:
        (name, config), = candidate.stage.items()
        settings = {key: value for key, value in config.items() if key != "layers"}
        key = (name, json.dumps(settings, sort_keys=True))
        merged.setdefault(key, {**settings, "layers": []})["layers"].extend(config.get("layers", []))

    def order(item: tuple[tuple[str, str], dict]) -> tuple:
        (name, settings), _ = item
        return PASS_ORDER.index(name), settings

    stages = []
    for (name, _), config in sorted(merged.items(), key=order):
        layers = sorted(config.pop("layers"))
        stages.append({name: {"layers": layers, **config} if layers else config})
    return stages
