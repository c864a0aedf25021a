"""The base-vs-compressed table (terminal and markdown) and the markdown report of an `apply` run.

Metric dict contract, shared by apply, the manifest and this report (a missing key prints as "-"):

    params               int    unique parameters, tied weights once      (size.count_params)
    size_bytes           int    bytes on disk of the weights               (size.safetensors_bytes
                                                                            or dir_size(..., weights_only))
    perplexity           float  sliding-window perplexity                  (perplexity.perplexity().ppl)
    decode_tokens_per_s  float  greedy decode throughput, prefill excluded (measure_latency()["tokens_per_s"])
    prefill_ms           float  one forward over the prompt                (measure_latency()["prefill_ms"])
    load_seconds         float  time to load the model                     (latency.load_time)
    compress_seconds     float  time the recipe's stages took (compressed model only)

An encoder (eval/encoder_eval.py) has no perplexity, decode tokens/s or prefill ms; once base or compressed
holds one of its task scores (TASK_KEYS), those decoder rows are printed only where measured. Its keys, all
optional:

    accuracy, f1 | macro_f1, matthews_corrcoef   float  classification scores on the task split
    spearman, pearson                            float  similarity correlations on the task split
    batch_ms             float  mean ms of one forward over a batch of task texts (EncoderTask.latency)
    examples_per_s       float  batch size / that time
    peak_ram_forward_mb  float  peak resident MiB after one forward (measure_memory(forward_only=True))

Optional keys: a row is printed only when base or compressed has a value, so tables of runs that do
not measure them stay as they were.

    macs_per_token         float  multiply-adds per token of a prefill     (macs_per_token()["total"])
    decode_macs_per_token  float  multiply-adds of one decoded token       (macs_per_decode_token()["total"])
    decode_ms_per_token    float  latency of one decode step (no prefill)  (measure_latency()["decode_ms_per_token"])
    peak_ram_load_mb       float  peak resident MiB once loaded            (measure_memory()["peak_rss_load_mb"])
    peak_ram_generate_mb   float  peak resident MiB after generating       (measure_memory()["peak_rss_generate_mb"])

    perplexity_by_dataset  {name: float}  every dataset of a recipe that names several, the primary
                                          (`perplexity`) first; one row per dataset, "perplexity (NAME)"

Stage rows (one per recipe stage): `stage` (name), `seconds`, `params` and `perplexity` after it (primary), or
an encoder's primary task score after it (`accuracy` or `spearman`, the Evaluator's quality_name).
Encoder protocols (report's `protocols`, the manifest's evaluation): `task` {kind, dataset, config, split,
examples, max_length, batch_size, primary, ...} and `latency` {batch_size, repeats, warmup, tokens_per_example,
split, device, ...}.
Perplexity protocol dict: `dataset`, `split`, `window`, `stride`, `tokens`, `bos` (PerplexityResult.protocol
plus what the caller knows about the data), and `tied_embeddings`, per measured model ({"base": bool,
"compressed": bool}; a plain bool in manifests written before llmshrink recorded it per model). With several
datasets, the primary one's fields plus `datasets`: {name: its own fields and `domain` ("in" or "out")}.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from llmshrink.fileio import atomic_write_text

MISSING = "-"
BY_DATASET = "perplexity_by_dataset"  # {name: perplexity} of a recipe with several datasets
# The task scores an encoder gets for each task kind (task_data.TaskKind), the primary one (stage rows, the
# Evaluator's quality()) first: the one table of them (eval/encoder_eval.py scores them, compare.py plots the
# primary ones). Here, in a module without torch or pydantic.
TASK_METRICS = {"classification": ("accuracy", "f1", "macro_f1", "matthews_corrcoef"),
                "similarity": ("spearman", "pearson")}
PRIMARY_TASK_KEYS = tuple(keys[0] for keys in TASK_METRICS.values())  # accuracy, spearman
METRIC_KEYS = (
    "params",
    "size_bytes",
    "macs_per_token",
    "decode_macs_per_token",
    "perplexity",
    *(key for keys in TASK_METRICS.values() for key in keys),
    "decode_tokens_per_s",
    "decode_ms_per_token",
    "prefill_ms",
    "batch_ms",
    "examples_per_s",
    "load_seconds",
    "peak_ram_load_mb",
    "peak_ram_generate_mb",
    "peak_ram_forward_mb",
    "compress_seconds",
)
COMPRESSED_ONLY = {"compress_seconds"}
# The scores a `generation` result may hold (0-100); its other keys (samples, ...) are not metrics.
GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "meteor")
# An encoder's task scores (TASK_METRICS), the primary ones (quality_name) first.
TASK_KEYS = (*PRIMARY_TASK_KEYS, *(key for keys in TASK_METRICS.values() for key in keys[1:]))
ENCODER_KEYS = (*TASK_KEYS, "batch_ms", "examples_per_s", "peak_ram_forward_mb")
DECODER_KEYS = {"perplexity", "decode_tokens_per_s", "prefill_ms"}  # optional in an encoder's table
OPTIONAL = {"macs_per_token", "decode_macs_per_token", "decode_ms_per_token", "peak_ram_load_mb",
            "peak_ram_generate_mb", *ENCODER_KEYS}


def _count(v: float) -> str:
    return f"{int(v):,}"


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


# key -> (row label, formatter of the raw value)
_ROWS: dict[str, tuple[str, Callable[[float], str]]] = {
    "params": ("params", _count),
    "size_bytes": ("size on disk (MB)", lambda v: f"{v / 1e6:.2f}"),
    "macs_per_token": ("MACs/token (M)", lambda v: f"{v / 1e6:.2f}"),
    "decode_macs_per_token": ("decode MACs/token (M)", lambda v: f"{v / 1e6:.2f}"),
    "perplexity": ("perplexity", _fixed(2)),
    "accuracy": ("accuracy", _fixed(4)),
    "f1": ("F1", _fixed(4)),
    "macro_f1": ("macro F1", _fixed(4)),
    "matthews_corrcoef": ("MCC", _fixed(4)),
    "spearman": ("Spearman", _fixed(4)),
    "pearson": ("Pearson", _fixed(4)),
    "decode_tokens_per_s": ("decode tokens/s", _fixed(1)),
    "decode_ms_per_token": ("decode ms/token", _fixed(2)),
    "prefill_ms": ("prefill ms", _fixed(1)),
    "batch_ms": ("latency per batch (ms)", _fixed(2)),
    "examples_per_s": ("examples/s", _fixed(1)),
    "load_seconds": ("load time (s)", _fixed(2)),
    "peak_ram_load_mb": ("peak RAM, load (MiB)", _fixed(0)),
    "peak_ram_generate_mb": ("peak RAM, generate (MiB)", _fixed(0)),
    "peak_ram_forward_mb": ("peak RAM, forward (MiB)", _fixed(0)),
    "compress_seconds": ("compression time (s)", _fixed(1)),
}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_metric(key: str, value: float) -> str:
    """A metric value as report.md and comparison.md show it; unknown ints get separators, floats 4 digits."""
    key = "perplexity" if key.startswith(f"{BY_DATASET}/") else key  # compare's flat perplexity_by_dataset/NAME
    if key in _ROWS:
        return _ROWS[key][1](value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _cell(key: str, value) -> str:
    return format_metric(key, value) if _is_number(value) else MISSING


def ratio(base, compressed) -> str:
    """compressed / base as '0.78x'; '-' when either is missing or the ratio is undefined."""
    if not (_is_number(base) and _is_number(compressed)) or base == 0:
        return MISSING
    r = compressed / base
    return f"{r:.2f}x" if math.isfinite(r) else MISSING


def dataset_names(*metrics: dict) -> list[str]:
    """The perplexity datasets named in these metric dicts, in order of appearance; [] for one dataset."""
    names: dict[str, None] = {}
    for m in metrics:
        names.update(dict.fromkeys(m.get(BY_DATASET) if isinstance(m.get(BY_DATASET), dict) else {}))
    return list(names)


def comparison_rows(base: dict, compressed: dict, keys: Sequence[str] = METRIC_KEYS) -> list[list[str]]:
    """[label, base, compressed, ratio] per metric key, as display strings; "perplexity (NAME)" per dataset
    where the metrics have perplexity_by_dataset."""
    rows = []
    encoder = is_encoder(base, compressed)
    optional = OPTIONAL | DECODER_KEYS if encoder else OPTIONAL
    for key in keys:
        names = dataset_names(compressed, base) if key == "perplexity" else []
        if names:
            for name in names:
                b, c = (_dict(m.get(BY_DATASET)).get(name) for m in (base, compressed))
                rows.append([f"perplexity ({name})", _cell(key, b), _cell(key, c), ratio(b, c)])
            continue
        label = _ROWS[key][0] if key in _ROWS else key
        b = None if key in COMPRESSED_ONLY else base.get(key)
        c = compressed.get(key)
        if key in optional and not (_is_number(b) or _is_number(c)):
            continue
        rows.append([label, _cell(key, b), _cell(key, c), ratio(b, c)])
    return rows


def is_encoder(*metrics: dict) -> bool:
    """Whether these metric dicts are an encoder's: one of them holds a task score (TASK_KEYS)."""
    return any(_is_number(m.get(key)) for m in metrics for key in TASK_KEYS)


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _task_values(values) -> dict[str, float]:
    """{metric: value} of one task: numbers only, standard errors left out, lm-eval's ',none' dropped."""
    out: dict[str, float] = {}
    for key, value in (values if isinstance(values, dict) else {}).items():
        metric, _, filt = str(key).partition(",")
        if metric.endswith("_stderr") or not _is_number(value) or not math.isfinite(value):
            continue
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    return out


def task_metric_rows(base: dict, compressed: dict) -> list[list[str]]:
    """[label, base, compressed, ratio] for the nested results: lm_eval {task: {metric}} and generation
    {metric} (ROUGE/BLEU/METEOR, 0-100). Rows follow the compressed model's results."""
    rows: list[tuple[str, float | None, float]] = []
    base_tasks = base.get("lm_eval") if isinstance(base.get("lm_eval"), dict) else {}
    for task, values in (compressed.get("lm_eval") or {}).items():
        base_values = _task_values(base_tasks.get(task))
        rows += [(f"{task} {m}", base_values.get(m), v) for m, v in _task_values(values).items()]
    base_gen = _task_values(base.get("generation"))
    rows += [(m, base_gen.get(m), v) for m, v in _task_values(compressed.get("generation")).items()
             if m in GENERATION_METRICS]
    return [[label, MISSING if b is None else f"{b:.4g}", f"{c:.4g}", ratio(b, c)] for label, b, c in rows]


HEADER = ["metric", "base", "compressed", "ratio"]


def format_table(base: dict, compressed: dict) -> str:
    """Plain-text table for the terminal: metric | base | compressed | ratio."""
    rows = [HEADER, *comparison_rows(base, compressed)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]

    def line(r: list[str]) -> str:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        return " | ".join(cells)

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def _md_table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _yes_no(v) -> str:
    return MISSING if v is None else ("yes" if v else "no")


def _tied_text(v) -> str:
    """Tied embeddings of each measured model ("base yes, compressed no"), or of the one model."""
    if isinstance(v, dict):
        return ", ".join(f"{which} {_yes_no(tied)}" for which, tied in v.items()) or MISSING
    return _yes_no(v)


def protocol_line(protocol: dict) -> str:
    """One line that says how the perplexity was measured; printed beside every perplexity."""
    dataset = protocol.get("dataset", MISSING)
    split = protocol.get("split")
    tokens = protocol.get("tokens")
    bos = protocol.get("bos")
    bos_text = MISSING if bos is None else ("BOS prepended to each window" if bos else "no BOS")
    parts = [
        f"dataset {dataset}" + (f" ({split})" if split else ""),
        f"window {protocol.get('window', MISSING)}",
        f"stride {protocol.get('stride', MISSING)}",
        f"{tokens:,} tokens" if isinstance(tokens, int) else f"tokens {MISSING}",
        bos_text,
        f"tied embeddings: {_tied_text(protocol.get('tied_embeddings'))}",
    ]
    return "Perplexity protocol: " + ", ".join(parts)


def protocol_lines(protocol: dict) -> list[str]:
    """protocol_line, or one line per dataset ("Perplexity protocol (NAME, out-of-domain): ...")."""
    datasets = _dict(protocol.get("datasets"))
    if not datasets:
        return [protocol_line(protocol)]
    lines = []
    for name, own in datasets.items():
        own = {**_dict(own), "tied_embeddings": protocol.get("tied_embeddings")}
        domain = {"in": ", in-domain", "out": ", out-of-domain"}.get(own.get("domain"), "")
        lines.append(protocol_line(own).replace("Perplexity protocol:", f"Perplexity protocol ({name}{domain}):", 1))
    return lines


def stage_quality_key(stage_rows: list[dict]) -> str:
    """The score the stage rows hold: perplexity, else an encoder's primary task score (accuracy, spearman)."""
    if not any("perplexity" in r for r in stage_rows):
        for key in TASK_KEYS:
            if any(key in r for r in stage_rows):
                return key
    return "perplexity"


def _stage_cells(row: dict, quality: str = "perplexity") -> list[str]:
    seconds = row.get("seconds")
    return [
        str(row.get("stage", MISSING)),
        _fixed(1)(seconds) if _is_number(seconds) else MISSING,
        _cell("params", row.get("params")),
        _cell(quality, row.get(quality)),
    ]


def task_protocol_line(task: dict) -> str:
    """One line that says how an encoder's task scores were measured."""
    examples = task.get("examples")
    config = f" ({task['config']})" if task.get("config") else ""
    parts = [
        f"{task.get('kind', MISSING)} on {task.get('dataset', MISSING)}{config} split {task.get('split', MISSING)}",
        f"{examples:,} examples" if isinstance(examples, int) else f"examples {MISSING}",
        f"max_length {task.get('max_length', MISSING)}",
        f"batch {task.get('batch_size', MISSING)}",
        f"primary metric {task.get('primary', MISSING)}",
    ]
    return "Task protocol: " + ", ".join(parts) + (f" ({task['how']})" if task.get("how") else "")


def latency_protocol_line(latency: dict) -> str:
    """One line that says how an encoder's latency per batch was measured."""
    return (f"Latency protocol: batch of {latency.get('batch_size', MISSING)} examples of the "
            f"{latency.get('split', MISSING)} split, padded to {latency.get('tokens_per_example', MISSING)} tokens, "
            f"mean of {latency.get('repeats', MISSING)} forwards after {latency.get('warmup', MISSING)} warm-up, "
            f"on {latency.get('device', MISSING)}")


def encoder_protocol_lines(protocols: dict) -> list[str]:
    """The task and latency protocol lines of an encoder's evaluation (none for a decoder's)."""
    task, latency = _dict(protocols.get("task")), _dict(protocols.get("latency"))
    if not task:
        return []
    return [task_protocol_line(task)] + ([latency_protocol_line(latency)] if latency else [])


def render_report_md(
    name: str, base: dict, compressed: dict, stage_rows: list[dict], protocol: dict, notes: list[str],
    curves_png: str | None = None, protocols: dict | None = None,
) -> str:
    """The markdown text write_report_md writes."""
    encoder_lines = encoder_protocol_lines(_dict(protocols))
    quality = stage_quality_key(stage_rows)
    bos = protocol.get("bos")
    datasets = list(_dict(protocol.get("datasets")))
    primary = f" ({datasets[0]})" if datasets else ""
    details = [
        ("dataset", protocol.get("dataset", MISSING)),
        ("split", protocol.get("split", MISSING)),
        ("window", protocol.get("window", MISSING)),
        ("stride", protocol.get("stride", MISSING)),
        ("tokens", protocol.get("tokens", MISSING)),
        ("BOS", MISSING if bos is None else ("prepended to each window" if bos else "not added")),
        ("tied embeddings", _tied_text(protocol.get("tied_embeddings"))),
    ]
    parts = [
        f"# llmshrink report: {name}",
        "## Base vs compressed",
        _md_table(HEADER, comparison_rows(base, compressed)),
        "## Stages",
        _md_table(
            ["stage", "seconds", "params after", f"{quality} after" + (primary if quality == "perplexity" else "")],
            [_stage_cells(r, quality) for r in stage_rows],
        )
        if stage_rows
        else "No stages ran.",
    ]
    tasks = task_metric_rows(base, compressed)
    if tasks:
        parts += ["## Task metrics", _md_table(["task metric", "base", "compressed", "ratio"], tasks)]
    if curves_png:
        parts += ["## Training curves", f"![training loss and eval perplexity by tokens]({curves_png})"]
    if encoder_lines:
        parts += ["## Evaluation protocol", *encoder_lines]
    if protocol or not encoder_lines:  # an encoder measures no perplexity
        parts += [
            "## Perplexity protocol",
            *protocol_lines(protocol),
        ]
        if datasets:
            parts.append(f"The first is the primary dataset{primary}: the stages' perplexity, and the details below.")
        parts.append("\n".join(f"- {k}: {v}" for k, v in details))
    if notes:
        parts += ["## Notes", "\n".join(f"- {n}" for n in notes)]
    return "\n\n".join(parts) + "\n"


def write_report_md(
    path: str | os.PathLike,
    name: str,
    base: dict,
    compressed: dict,
    stage_rows: list[dict],
    protocol: dict,
    notes: list[str],
    curves_png: str | None = None,
    protocols: dict | None = None,
) -> Path:
    """Write the markdown report atomically (temp file in the same directory, then os.replace).

    `curves_png`: a file name beside the report with the training curves, linked under its own heading.
    `protocols`: the Evaluator's other protocols; an encoder's `task` and `latency` are printed (and, with no
    perplexity protocol, instead of it).
    """
    text = render_report_md(name, base, compressed, stage_rows, protocol, notes, curves_png, protocols)
    return atomic_write_text(path, text)
