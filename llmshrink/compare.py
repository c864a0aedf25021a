"""Compare checkpoints written by `llmshrink apply` (and their base models) side by side.

`compare(paths, output_dir)` reads each checkpoint's `llmshrink.json` and writes, atomically:

    comparison.md    a table (size, perplexity, speed and their ratios vs the base) with the
                     Pareto-optimal rows marked, the plot, every metric, warnings and notes
    comparison.json  the same data as numbers, plus which rows are Pareto-optimal
    pareto.png       size on disk (MB) vs the chosen metric, the Pareto front as a step line

A row is Pareto-optimal when no other row is at least as good on both size on disk (smaller is
better) and the chosen metric, and strictly better on one. Ratios are a checkpoint's value divided
by its base model's value measured in the same run (same machine, same protocol), so timing noise
between runs does not leak into them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmshrink.compare_protocols import (
    group_protocols,
    out_of_domain,
    protocol_text,
    protocol_warnings,
    protocols_of,
)
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.report import BY_DATASET, METRIC_KEYS, MISSING, PRIMARY_TASK_KEYS, format_metric, ratio
from llmshrink.fileio import atomic_write_text
from llmshrink.pareto_plot import X_KEY, save_pareto_png

MANIFEST = "llmshrink.json"
MD_NAME, JSON_NAME, PNG_NAME = "comparison.md", "comparison.json", "pareto.png"

# Measured anew on every run and noisy, so a base measured twice is expected to differ in these.
_TIMING = re.compile(r"(per_s|_ms|_seconds|peak_ram)")  # tokens_per_s, examples_per_s, batch_ms, ...

# Direction of a metric, from the words of its last name part ("lm_eval/arc_easy/acc_norm,none" ->
# "acc", "norm"; the ",filter" suffix of lm-eval is dropped). Any cost word -> lower is better; else
# any score word (or a word starting with a score prefix) -> higher is better; else unknown.
_COST_WORDS = {"perplexity", "ppl", "loss", "nll", "bpb", "bits", "error", "err", "wer", "cer", "ter",
               "stderr", "ms", "seconds", "bytes", "params", "macs", "ram", "latency"}
_SCORE_WORDS = {"acc", "accuracy", "f1", "em", "exact", "match", "mc1", "mc2", "mcc", "score", "meteor",
                "chrf", "sacrebleu", "throughput", "matthews", "corrcoef", "spearman", "pearson"}
_SCORE_PREFIXES = ("acc", "rouge", "bleu", "pass@")


# What `compare` plots by default for encoders, which have no perplexity (their evaluator's primary scores).
ENCODER_SCORES = PRIMARY_TASK_KEYS


def higher_is_better(metric: str) -> bool | None:
    """True for accuracy-like metrics, False for costs (perplexity, loss, time), None if unknown."""
    if metric.startswith(f"{BY_DATASET}/"):
        return False  # perplexity_by_dataset/NAME: the name says nothing
    leaf = metric.rsplit("/", 1)[-1].split(",", 1)[0].lower()
    if leaf.endswith("per_s"):
        return True  # a rate: tokens/s
    words = [w for w in re.split(r"[^a-z0-9@]+", leaf) if w]
    if any(w in _COST_WORDS for w in words):
        return False
    if any(w in _SCORE_WORDS or w.startswith(_SCORE_PREFIXES) for w in words):
        return True
    return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics dict; nested ones as 'lm_eval/task/metric'. Non-numbers are skipped."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif _is_number(value):
            flat[name] = value
    return flat


def pareto_flags(points: Sequence[tuple[float, float] | None], higher_better: bool) -> list[bool | None]:
    """Per point: True if no other point is as small and as good and strictly better in one; None if absent.

    x (size) is always lower-is-better; y follows `higher_better`. Identical points do not dominate
    each other, so both stay on the front.
    """
    sign = -1.0 if higher_better else 1.0  # compare -y when higher is better, so smaller is always better
    valid = [p is not None and math.isfinite(p[0]) and math.isfinite(p[1]) for p in points]
    flags: list[bool | None] = []
    for i, p in enumerate(points):
        if not valid[i]:
            flags.append(None)
            continue
        x, y = p[0], sign * p[1]
        dominated = any(
            valid[j] and j != i and q[0] <= x and sign * q[1] <= y and (q[0] < x or sign * q[1] < y)
            for j, q in enumerate(points)
        )
        flags.append(not dominated)
    return flags


@dataclass
class Row:
    """One line of the comparison: a checkpoint or a base model."""

    name: str
    kind: str  # "base" | "checkpoint"
    base_model: str
    metrics: dict[str, float]
    passes: list[str] = field(default_factory=list)
    path: str | None = None
    base_metrics: dict[str, float] = field(default_factory=dict)  # its own run's base, for ratios
    pareto: bool | None = None

    def ratio(self, key: str) -> float | None:
        """metrics[key] / base_metrics[key]; None for base rows and missing or zero values."""
        b, c = self.base_metrics.get(key), self.metrics.get(key)
        if b is None or c is None or b == 0:
            return None
        r = c / b
        return r if math.isfinite(r) else None

    def to_json(self) -> dict:
        ratios = {k: r for k in self.metrics if (r := self.ratio(k)) is not None}
        return {"name": self.name, "kind": self.kind, "path": self.path, "base_model": self.base_model,
                "passes": self.passes, "metrics": _finite(self.metrics), "ratios": ratios,
                "pareto": self.pareto}


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    # JSON has no inf/nan: write null (the markdown shows the value).
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


@dataclass
class _Checkpoint:
    path: Path
    given: str  # the path as the user wrote it
    manifest: dict


def _read_checkpoint(path: str | os.PathLike) -> _Checkpoint:
    given = str(path)
    directory = Path(path)
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is not a directory"
        raise LlmshrinkError(f"{given}: {what}; pass checkpoint directories written by `llmshrink apply`")
    file = directory / MANIFEST
    if not file.is_file():
        raise LlmshrinkError(f"{given}: no {MANIFEST}; not a checkpoint directory written by "
                             "`llmshrink apply`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LlmshrinkError(f"{file}: not valid JSON ({err})") from None
    metrics = manifest.get("metrics") if isinstance(manifest, dict) else None
    if not (isinstance(metrics, dict) and isinstance(metrics.get("base"), dict)
            and isinstance(metrics.get("compressed"), dict)):
        raise LlmshrinkError(f"{file}: metrics: missing or incomplete; expected "
                             "{'base': {...}, 'compressed': {...}} as written by `llmshrink apply`")
    return _Checkpoint(directory, given, manifest)


def _names(checkpoints: list[_Checkpoint]) -> list[str]:
    """Manifest names, made unique with the directory name (then the path given) where they clash."""
    first = [str(c.manifest.get("name") or c.path.name) for c in checkpoints]
    names = [f"{n} ({c.path.name})" if first.count(n) > 1 else n
             for n, c in zip(first, checkpoints, strict=True)]
    return [f"{f} ({c.given})" if names.count(n) > 1 else n
            for f, n, c in zip(first, names, checkpoints, strict=True)]


def _pass_names(manifest: dict) -> list[str]:
    return [str(p.get("pass", MISSING)) for p in manifest.get("passes") or [] if isinstance(p, dict)]


def _base_id(c: _Checkpoint) -> str:
    base = c.manifest.get("base_model")
    return str(base.get("id", MISSING)) if isinstance(base, dict) else MISSING


def _base_rows(checkpoints: list[_Checkpoint], names: list[str]) -> tuple[list[Row], list[str]]:
    """One row per base model id (from its first checkpoint) and notes where the checkpoints disagree."""
    rows: list[Row] = []
    notes: list[str] = []
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(checkpoints):
        groups.setdefault(_base_id(c), []).append(i)
    for base_id, members in groups.items():
        measured = [flatten_metrics(checkpoints[i].manifest["metrics"]["base"]) for i in members]
        rows.append(Row(name=f"base ({base_id})", kind="base", base_model=base_id, metrics=measured[0]))
        keys = sorted({k for m in measured for k in m if not _TIMING.search(k)})
        for key in keys:
            values = [(names[i], m[key]) for i, m in zip(members, measured, strict=True) if key in m]
            if any(not math.isclose(v, values[0][1], rel_tol=1e-9) for _, v in values):
                listed = ", ".join(f"{n}: {format_metric(key, v)}" for n, v in values)
                notes.append(f"base {base_id}: {key} differs between checkpoints ({listed}); the base row "
                             f"shows {names[members[0]]}'s, and each checkpoint's ratios use its own run's "
                             "base.")
    return rows, notes


def _metric_label(metric: str) -> str:
    """The ratio column's name: ppl, ppl (NAME) for a named perplexity dataset, else the key."""
    if metric.startswith(f"{BY_DATASET}/"):
        return f"ppl ({metric.removeprefix(f'{BY_DATASET}/')})"
    return "ppl" if metric == "perplexity" else metric


def _column(key: str) -> str:
    """A value column's name: perplexity (NAME) for a named perplexity dataset, size (MB), else the key."""
    if key.startswith(f"{BY_DATASET}/"):
        return f"perplexity ({key.removeprefix(f'{BY_DATASET}/')})"
    return "size (MB)" if key == X_KEY else key


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---", "---"] + ["---:"] * (len(header) - 2)  # text columns left, numbers right
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _cell(row: Row, key: str) -> str:
    v = row.metrics.get(key)
    return MISSING if v is None else format_metric(key, v)


def _ratio_cell(row: Row, key: str) -> str:
    return ratio(row.base_metrics.get(key), row.metrics.get(key)) if row.kind == "checkpoint" else MISSING


_MAIN_COLUMNS = {"params", X_KEY, "perplexity", "decode_tokens_per_s", "compress_seconds"}


def _perplexity_keys(rows: list[Row]) -> list[str]:
    """A column per named perplexity dataset present; plain perplexity where a row has it without names. None
    for encoders: scored on their task, shown as the plotted metric's column."""
    named = list(dict.fromkeys(k for r in rows for k in r.metrics if k.startswith(f"{BY_DATASET}/")))
    unnamed = any("perplexity" in r.metrics and not any(k in r.metrics for k in named) for r in rows)
    return (["perplexity"] if unnamed else []) + named


def _main_table(rows: list[Row], metric: str) -> str:
    keys = _perplexity_keys(rows)
    keys += [metric] if metric not in _MAIN_COLUMNS and metric not in keys else []
    header = ["name", "passes", "params", "size (MB)", "size ratio"]
    for key in keys:
        header += [_column(key), f"{_metric_label(key)} ratio"]
    # Speed: decoders' decode rate; encoders' examples per second (one forward over a batch).
    speed = "decode_tokens_per_s" if any("decode_tokens_per_s" in r.metrics for r in rows) or not any(
        "examples_per_s" in r.metrics for r in rows) else "examples_per_s"
    header += ["decode tok/s" if speed == "decode_tokens_per_s" else "examples/s", "speedup", "compress (s)",
               "Pareto"]
    body = []
    for row in rows:
        cells = [row.name, " + ".join(row.passes) or ("(base)" if row.kind == "base" else "(none)"),
                 _cell(row, "params"), _cell(row, X_KEY), _ratio_cell(row, X_KEY)]
        for key in keys:
            cells += [_cell(row, key), _ratio_cell(row, key)]
        pareto = MISSING if row.pareto is None else ("**yes**" if row.pareto else "no")
        cells += [_cell(row, speed), _ratio_cell(row, speed),
                  _cell(row, "compress_seconds"), pareto]
        body.append(cells)
    return _md_table(header, body)


def _all_keys(rows: list[Row]) -> list[str]:
    """The known metric keys present, the named perplexity datasets right after perplexity, then the rest."""
    present = {k for r in rows for k in r.metrics}
    named = [k for k in _perplexity_keys(rows) if k != "perplexity"]
    known: list[str] = []
    for key in METRIC_KEYS:
        known += ([key] if key in present else []) + (named if key == "perplexity" else [])
    return known + sorted(present - set(known))


def render_markdown(data: dict, rows: list[Row], png_name: str | None = PNG_NAME) -> str:
    """The text of comparison.md."""
    metric = data.get("metric_label") or data["metric"]
    better = "higher" if data["higher_is_better"] else "lower"
    parts = ["# llmshrink comparison"]
    parts += [f"> **Warning:** {w}" for w in data["warnings"]]
    parts += [
        f"Pareto front on size on disk (smaller is better) and {metric} ({better} is better): a row marked "
        "**yes** is beaten on both by no other row. Ratios are each checkpoint's value / its base model's, "
        "measured in the same run; speedup is the decode tokens/s ratio (for encoders, examples/s).",
        _main_table(rows, data["metric"]),
    ]
    if png_name:
        parts.append(f"![size on disk vs {metric}]({png_name})")
    keys = _all_keys(rows)
    every = [[r.name, r.kind, *(_cell(r, k) for k in keys)] for r in rows]
    labels = [_column(k) for k in keys]
    parts += ["## All metrics", _md_table(["name", "kind", *labels], every)]
    if data["protocols"]:
        lines = [f"- {', '.join(members)}: {protocol_text(p)}"
                 for p, members in group_protocols(data["protocols"])]
        parts += ["## Perplexity protocol", "\n".join(lines)]
    if data["notes"]:
        parts += ["## Notes", "\n".join(f"- {n}" for n in data["notes"])]
    parts += ["## Checkpoints", "\n".join(f"- {r.name}: `{r.path}` (base {r.base_model})"
                                          for r in rows if r.kind == "checkpoint")]
    return "\n\n".join(parts) + "\n"


def _direction(metric: str, given: bool | None) -> bool:
    if metric == X_KEY:
        raise LlmshrinkError(f"metric: {metric!r} is already the x axis; choose a quality metric such as "
                             "perplexity")
    if given is not None:
        return given
    inferred = higher_is_better(metric)
    if inferred is None:
        raise LlmshrinkError(f"metric: cannot tell whether higher or lower is better for {metric!r}; "
                             "say which (--higher-is-better or --lower-is-better)")
    return inferred


def compare(
    paths: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    metric: str = "perplexity",
    include_base: bool = True,
    higher_better: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Compare checkpoint dirs; write comparison.md, comparison.json and pareto.png into `output_dir`.

    `metric`: a metrics key, nested ones as 'lm_eval/TASK/METRIC'; "perplexity" means the first dataset
    a recipe marked `domain: out` where the checkpoints measured one ('perplexity_by_dataset/NAME'), else
    the primary perplexity. `higher_better`: None infers the direction from the name (higher_is_better()).
    Returns the data written to comparison.json.
    """
    if not paths:
        raise LlmshrinkError("compare: no checkpoint directories given; pass at least one")
    seen: dict[Path, str] = {}
    for p in paths:
        resolved = Path(p).resolve()
        if resolved in seen:
            raise LlmshrinkError(f"compare: {p} is given twice (also as {seen[resolved]}); "
                                 "pass each checkpoint once")
        seen[resolved] = str(p)
    checkpoints = [_read_checkpoint(p) for p in paths]
    names = _names(checkpoints)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise LlmshrinkError(f"output: {out} is a file; pass a directory to write the comparison into")

    rows = [Row(name=n, kind="checkpoint", base_model=_base_id(c), path=c.given,
                metrics=flatten_metrics(c.manifest["metrics"]["compressed"]),
                base_metrics=flatten_metrics(c.manifest["metrics"]["base"]),
                passes=_pass_names(c.manifest))
            for c, n in zip(checkpoints, names, strict=True)]
    base_rows, notes = _base_rows(checkpoints, names)
    if include_base:
        rows = base_rows + rows
    available = _all_keys(rows)
    if metric == "perplexity" and "perplexity" not in available:  # encoders: their task's primary score
        metric = next((key for key in ENCODER_SCORES if key in available), metric)
    label = metric
    out_name = out_of_domain([c.manifest for c in checkpoints]) if metric == "perplexity" else None
    if out_name is not None and f"{BY_DATASET}/{out_name}" in available:
        metric, label = f"{BY_DATASET}/{out_name}", f"perplexity ({out_name}, out-of-domain)"
        log(f"metric: perplexity on {out_name}, the first dataset marked domain: out "
            f"(--metric {BY_DATASET}/NAME picks another)")
    if metric not in available:
        raise LlmshrinkError(f"metric: {metric!r} is in no row's metrics; available: {', '.join(available)}")
    higher = _direction(metric, higher_better)

    def point(r: Row) -> tuple[float, float] | None:
        return (r.metrics[X_KEY], r.metrics[metric]) if X_KEY in r.metrics and metric in r.metrics else None

    for row, flag in zip(rows, pareto_flags([point(r) for r in rows], higher), strict=True):
        row.pareto = flag
    missing = [r.name for r in rows if r.pareto is None]
    if missing:
        notes.append(f"left out of the Pareto front and the plot (no {X_KEY} or {metric}): "
                     f"{', '.join(missing)}")
    if len({r.base_model for r in rows}) > 1 and "perplexity" in metric:
        notes.append("the rows come from different base models; perplexity per token depends on the "
                     "tokenizer, so compare perplexities only between rows of one base model.")
    protocols = protocols_of([c.manifest for c in checkpoints], names)
    warnings = protocol_warnings(protocols)

    front = sorted((r for r in rows if r.pareto), key=lambda r: (r.metrics[X_KEY], r.metrics[metric]))
    data = {"metric": metric, "metric_label": label, "higher_is_better": higher, "x": X_KEY, "pareto": [r.name for r in front],
            "rows": [r.to_json() for r in rows], "warnings": warnings, "notes": notes, "protocols": protocols}
    out.mkdir(parents=True, exist_ok=True)
    save_pareto_png(out / PNG_NAME, rows, metric, higher, label)
    atomic_write_text(out / JSON_NAME, json.dumps(data, indent=2) + "\n")
    atomic_write_text(out / MD_NAME, render_markdown(data, rows))
    for w in warnings:
        log(f"warning: {w}")
    log(f"Pareto-optimal on size and {label}: {', '.join(data['pareto'])}")
    log(f"wrote {out / MD_NAME}, {out / JSON_NAME}, {out / PNG_NAME}")
    return data
