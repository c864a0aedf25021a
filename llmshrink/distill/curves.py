"""Training curves: a compact history per training stage, and the PNG that report.md links to."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def training_curve(result, points: int = 200) -> dict:
    """A TrainResult's loss by tokens, thinned to about `points` points, and its eval history."""
    n = len(result.losses)
    every = max(1, n // points)
    keep = sorted(set(range(0, n, every)) | {n - 1})
    return {
        "tokens": [result.step_tokens[i] for i in keep],
        "loss": [round(result.losses[i], 5) for i in keep],
        "eval": [[tokens, round(value, 4)] for _, tokens, value in result.evals],
    }


def stage_curves(records: list[dict]) -> Iterator[tuple[str, dict]]:
    """(label, curve) for every training stage in the engine's pass records, iterate's included."""
    for index, entry in enumerate(records):
        yield from _curves_of(f"{index}:{entry['pass']}", entry["record"])


def _curves_of(label: str, record: dict) -> Iterator[tuple[str, dict]]:
    if "curve" in record:
        yield label, record["curve"]
    for g, run in enumerate(record.get("runs", [])):  # iterate: one run per group
        for inner in run["stages"]:
            yield from _curves_of(f"{label} g{g} {inner['pass']}", inner["record"])


def save_training_curves(records: list[dict], path: Path) -> bool:
    """Draw every stage's loss (and eval perplexity, if measured) over its tokens; False if none trained."""
    from llmshrink.eval.plots import Panel, save_curves_png

    curves = list(stage_curves(records))
    if not curves:
        return False
    panels = [Panel("training loss", "tokens", "loss",
                    {label: (c["tokens"], c["loss"]) for label, c in curves}, log_y=True)]
    evals = {label: ([t for t, _ in c["eval"]], [v for _, v in c["eval"]]) for label, c in curves if c["eval"]}
    if evals:
        panels.append(Panel("eval perplexity during training", "tokens", "perplexity", evals, log_y=True))
    save_curves_png(path, panels)
    return True
