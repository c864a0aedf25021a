"""The model card (README.md) written beside every checkpoint, in the Hugging Face hub's format.

Reads the manifest that `apply` writes: name, description, license (optional), base_model {id, revision,
license (optional)}, metrics {base: {...}, compressed: {...}} (keys as in eval/report.py; a recipe with several
perplexity datasets adds perplexity_by_dataset, one row and one result each), evaluation {perplexity: protocol},
passes [{pass, record}] and exports {name: record} (the recipe's export: section, llmshrink/export). Optional task
metrics, in both metrics.base and metrics.compressed, become card results too when present:

    lm_eval     {task: {metric[,filter]: value}}   eval/lm_eval_bridge.py's results ("_stderr" entries skipped);
                                                    protocol in evaluation.lm_eval {tasks: {task: {num_fewshot,
                                                    samples}}}
    generation  {rouge1, rouge2, rougeL, bleu, meteor, ..., data}   eval/generation.py's result (only the
                                                    GENERATION_METRICS become results); protocol in
                                                    evaluation.generation {dataset, config, split}

The front matter (base_model, license, tags, library_name, pipeline_tag, model-index) is built with
huggingface_hub's ModelCardData and EvalResult, so it parses back with ModelCard and metadata_load.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from llmshrink.eval import report

# Only a hub id can go into the card's base_model field: not a local path (builtin: maps to its upstream).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Stands for this model's hub id in the load snippets; `llmshrink push` fills in the real one.
REPO_PLACEHOLDER = "ORG/NAME"
# Architecture class name suffix -> (hub pipeline tag, transformers auto class).
_TASKS = (
    ("ForCausalLM", "text-generation", "AutoModelForCausalLM"),
    ("LMHeadModel", "text-generation", "AutoModelForCausalLM"),
    ("ForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
    # A bare encoder (BertModel): sentence embeddings. Last, since every name above also ends in "Model".
    ("Model", "feature-extraction", "AutoModel"),
)
# llmshrink's models are causal LMs unless the manifest says otherwise.
_DEFAULT_TASK = ("", "text-generation", "AutoModelForCausalLM")
# Scores in a generation result; its other numbers (samples, prompts_truncated) are not metrics.


def model_card(manifest: dict[str, Any], recipe_text: str, *, architecture: str | None = None,
               repo_id: str | None = None) -> str:
    """README.md text: YAML front matter, description, metrics, passes, recipe, license, how to load.

    `architecture` (the transformers class, e.g. GPT2LMHeadModel) defaults to manifest["architecture"];
    `repo_id` to a placeholder that `llmshrink push` replaces.
    """
    architecture = architecture or manifest.get("architecture")
    _, pipeline_tag, auto_class = _task(architecture)
    base, base_hub_id = _base_ids(manifest)
    license_id = _license(manifest)
    data = card_data(manifest, architecture)
    name = manifest.get("name") or "compressed model"
    revision = _dict(manifest.get("base_model")).get("revision")
    base_text = f"`{base}`" + (f" (revision `{revision}`)" if revision else "") if base else "a base model"
    if base_hub_id and base_hub_id != base:
        base_text += f", made from [`{base_hub_id}`](https://huggingface.co/{base_hub_id})"
    parts = [
        f"---\n{data.to_yaml()}\n---\n",
        f"# {name}\n",
        f"{base_text} compressed with llmshrink ({pipeline_tag}).",
    ]
    if manifest.get("description"):
        parts.append(f"\n{manifest['description']}")
    metrics, evaluation = _dict(manifest.get("metrics")), _dict(manifest.get("evaluation"))
    parts += _metrics_section(metrics, evaluation.get("perplexity"), report.encoder_protocol_lines(evaluation))
    parts += _task_metrics_section(metrics)
    parts += _passes_section(manifest.get("passes"))
    parts += _exports_section(manifest.get("exports"))
    parts += _load_section(repo_id or REPO_PLACEHOLDER, auto_class)
    parts += ["\n## Recipe\n", f"```yaml\n{recipe_text.rstrip()}\n```\n"]
    parts += _license_section(license_id, base_hub_id or base)
    return "\n".join(parts)


def card_data(manifest: dict[str, Any], architecture: str | None = None) -> ModelCardData:
    """The card's front matter: base_model (hub id only), license, tags, library, pipeline, model-index."""
    architecture = architecture or manifest.get("architecture")
    _, hub_id = _base_ids(manifest)
    results = eval_results(manifest, architecture)
    return ModelCardData(
        base_model=hub_id,
        license=_license(manifest),
        tags=["llmshrink", "compression", *_pass_tags(manifest.get("passes"))],
        library_name="transformers",
        pipeline_tag=_task(architecture)[1],
        # model-index needs a model name; leave both out when there is nothing to report.
        model_name=(manifest.get("name") or "compressed model") if results else None,
        eval_results=results or None,
    )


def eval_results(manifest: dict[str, Any], architecture: str | None = None) -> list[EvalResult]:
    """The compressed model's results for the card's model-index: perplexity, lm_eval tasks, an encoder's task
    scores (evaluation.task {kind, dataset, config, split}), generation."""
    compressed = _dict(_dict(manifest.get("metrics")).get("compressed"))
    evaluation = _dict(manifest.get("evaluation"))
    task = _task(architecture or manifest.get("architecture"))[1]
    results: list[EvalResult] = []
    protocol = _dict(evaluation.get("perplexity"))
    by_dataset = _dict(compressed.get(report.BY_DATASET))
    datasets = _dict(protocol.get("datasets"))
    # One result per named dataset (with its own protocol), else the one perplexity.
    named = [(f"Perplexity ({name})", value, _dict(datasets.get(name))) for name, value in by_dataset.items()]
    for metric_name, value, proto in named or [("Perplexity", compressed.get("perplexity"), protocol)]:
        if not _finite(value):
            continue
        results.append(EvalResult(
            task_type=task,
            **_dataset(proto, "evaluation text"),
            metric_type="perplexity",
            metric_name=metric_name,
            metric_value=round(float(value), 4),
            metric_args={k: proto[k] for k in ("window", "stride", "tokens", "bos") if k in proto} or None,
        ))
    lm_eval_tasks = _dict(_dict(evaluation.get("lm_eval")).get("tasks"))
    for task_name, values in _dict(compressed.get("lm_eval")).items():
        settings = {k: v for k, v in _dict(lm_eval_tasks.get(task_name)).items()
                    if k in ("num_fewshot", "samples") and v is not None}
        for metric, value in _lm_eval_metrics(values).items():
            results.append(EvalResult(task_type=task, dataset_type=str(task_name), dataset_name=str(task_name),
                                      metric_type=metric, metric_value=round(value, 4),
                                      metric_name=f"{metric} (lm-evaluation-harness)", metric_args=settings or None))
    task_protocol = _dict(evaluation.get("task"))  # an encoder's task scores
    task_type = {"classification": "text-classification", "similarity": "sentence-similarity"}.get(
        task_protocol.get("kind"), task)
    for metric in report.TASK_KEYS:
        if _finite(compressed.get(metric)):
            results.append(EvalResult(task_type=task_type, **_dataset(task_protocol, "task examples"),
                                      metric_type=metric, metric_value=round(float(compressed[metric]), 4)))
    generation = _dict(compressed.get("generation"))
    # The data file's name, not its absolute path, when the protocol does not name the dataset.
    fallback = Path(str(generation["data"])).name if generation.get("data") else "generation prompts"
    for metric, value in _generation_metrics(generation).items():
        results.append(EvalResult(task_type=task, **_dataset(_dict(evaluation.get("generation")), fallback),
                                  metric_type=metric, metric_value=round(value, 4)))
    return results


# --- pieces --------------------------------------------------------------------------------------


def _task(architecture: str | None) -> tuple[str, str, str]:
    for suffix, pipeline_tag, auto_class in _TASKS:
        if architecture and architecture.endswith(suffix):
            return suffix, pipeline_tag, auto_class
    return _DEFAULT_TASK


def _base_ids(manifest: dict[str, Any]) -> tuple[str, str | None]:
    """(the base as the recipe named it, its hub id or None); builtin: models map to their upstream."""
    base = str(_dict(manifest.get("base_model")).get("id") or "")
    if base.startswith("builtin:"):
        from llmshrink.models import BUILTIN_MODELS

        info = BUILTIN_MODELS.get(base.removeprefix("builtin:"))
        return base, info.upstream if info else None
    return base, base if _HUB_ID.match(base) else None


def _license(manifest: dict[str, Any]) -> str:
    """The recipe's license, else the base model's, else "other" (unknown: the card says to check it)."""
    base = _dict(manifest.get("base_model"))
    return str(manifest.get("license") or base.get("license") or "other")


def _pass_tags(passes: Any) -> list[str]:
    names = [item.get("pass") for item in passes if isinstance(item, dict)] if isinstance(passes, list) else []
    # Hub tags are plain words: keep letters, digits and - _ . only.
    return [re.sub(r"[^\w.-]+", "-", str(n)).lower() for n in names if n]


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _dataset(protocol: dict, fallback: str) -> dict[str, Any]:
    """EvalResult dataset fields from an evaluation protocol {dataset, config, split}."""
    source = str(protocol.get("dataset") or fallback)
    return {"dataset_type": source, "dataset_name": source,
            "dataset_config": protocol.get("config") or None, "dataset_split": protocol.get("split") or None}


def _lm_eval_metrics(values: Any) -> dict[str, float]:
    """{metric: value} from one lm_eval task's results: 'acc,none' -> 'acc', other filters kept."""
    out: dict[str, float] = {}
    for key, value in _dict(values).items():
        metric, _, filt = str(key).partition(",")
        if metric.endswith("_stderr") or metric == "alias" or not _finite(value):
            continue
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    return out


def _generation_metrics(values: Any) -> dict[str, float]:
    return {k: float(v) for k, v in _dict(values).items() if k in report.GENERATION_METRICS and _finite(v)}


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def _metrics_section(metrics: dict, protocol: dict | None, encoder_lines: list[str] = ()) -> list[str]:
    if not metrics.get("compressed"):
        return []
    rows = report.comparison_rows(metrics.get("base") or {}, metrics["compressed"])
    table = ["| metric | base | compressed | ratio |", "|---|---:|---:|---:|"]
    table += [f"| {' | '.join(row)} |" for row in rows]
    lines = [*encoder_lines, *(report.protocol_lines(protocol) if protocol else [])]
    return ["\n## Metrics\n", *table] + [f"\n{line}" for line in lines]


def _task_metrics_section(metrics: dict) -> list[str]:
    """Base vs compressed for the optional lm_eval and generation metrics."""
    rows = report.task_metric_rows(_dict(metrics.get("base")), _dict(metrics.get("compressed")))
    if not rows:
        return []
    table = ["| task metric | base | compressed | ratio |", "|---|---:|---:|---:|"]
    table += [f"| {' | '.join(row)} |" for row in rows]
    return ["\n## Task metrics\n", *table]


def _passes_section(passes: Any) -> list[str]:
    if not isinstance(passes, list) or not passes:
        return []
    lines = ["\n## Passes\n"]
    for i, item in enumerate(passes, 1):
        item = item if isinstance(item, dict) else {"pass": str(item)}
        record = item.get("record") if isinstance(item.get("record"), dict) else {}
        # Scalars only: full records (per-layer shapes, permutations) stay in llmshrink.json.
        facts = [f"{k}={_number(v)}" for k, v in record.items() if isinstance(v, str | int | float | bool)]
        summary = f": {', '.join(facts)}" if facts else ""
        lines.append(f"{i}. `{item.get('pass', 'pass')}`{summary}")
    lines.append("\nEvery decision of every pass is in `llmshrink.json`.")
    return lines


def _exports_section(exports: Any) -> list[str]:
    """The recipe's export: section as written: one row per export (path, format, quant or dtype, size) with how
    its runtime's logits compared with the compressed model's on the export's probe."""
    if not isinstance(exports, dict) or not exports:
        return []
    table = ["| export | format | quant | size | max abs Δlogit | top-1 agreement |", "|---|---|---|---:|---:|---:|"]
    for name, record in exports.items():
        record = _dict(record)
        size = record.get("bytes")
        top1 = record.get("top1_agreement")
        cells = [f"`{record.get('path') or name}`", str(record.get("format", "–")),
                 str(record.get("quant") or record.get("dtype") or "–"),
                 f"{size / 1e6:.1f} MB" if _finite(size) else "–", _number(record.get("max_abs_logit_diff")),
                 f"{top1:.1%}" if _finite(top1) else "–"]
        table.append(f"| {' | '.join(cells)} |")
    return ["\n## Exports\n",
            "Written from this checkpoint by `llmshrink apply` and checked in their own runtimes (transformers, "
            "llama.cpp, onnxruntime) against the compressed model's logits; each folder's `export.json` has the "
            "details.\n", *table]


def _load_section(repo: str, auto_class: str) -> list[str]:
    return [
        "\n## How to load\n",
        "With llmshrink:\n",
        "```python\nimport llmshrink\nfrom huggingface_hub import snapshot_download\n\n"
        f"model = llmshrink.load(snapshot_download(\"{repo}\"))\n```\n",
        "Without llmshrink, with transformers only (compressed layers are rebuilt by the remote code in this "
        "repository):\n",
        f"```python\nfrom transformers import {auto_class}, AutoTokenizer\n\n"
        f"model = {auto_class}.from_pretrained(\"{repo}\", trust_remote_code=True)\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")\n```\n",
        f"`{repo}` is this model's id on the Hugging Face hub. For a local copy of this folder, pass its path "
        "to `from_pretrained` or `llmshrink.load` instead.",
    ]


def _license_section(license_id: str, base: str) -> list[str]:
    if license_id != "other":
        terms = f" This model is derived from `{base}`, whose license terms apply too." if base else ""
        return ["\n## License\n", f"`{license_id}`.{terms}"]
    whose = f"the base model `{base}`" if base else "the base model"
    return ["\n## License\n",
            f"Not recorded by llmshrink: this model is derived from {whose} and its license applies. Check it "
            "and set `license:` at the top of this card before publishing."]
