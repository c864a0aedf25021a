"""The model card (README.md) written beside every checkpoint.

Reads the manifest that `apply` writes: name, description, base_model {id, revision},
metrics {base: {...}, compressed: {...}} (keys as in eval/report.py), evaluation.perplexity (the
protocol) and passes [{pass, record}].
"""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub import ModelCardData

from llmshrink.eval.report import comparison_rows, protocol_line

# Only a hub id can go into the card's base_model field; local paths and builtin: names cannot.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_card(manifest: dict[str, Any], recipe_text: str) -> str:
    """README.md text: YAML front matter, description, metrics, passes, recipe, how to load."""
    base_info = manifest.get("base_model") or {}
    base = str(base_info.get("id") or "")
    data = ModelCardData(
        base_model=base if _HUB_ID.match(base) else None,
        tags=["llmshrink", "compression"],
        library_name="transformers",
    )
    name = manifest.get("name") or "compressed model"
    revision = base_info.get("revision")
    base_text = f"`{base}`" + (f" (revision `{revision}`)" if revision else "") if base else "a base model"
    parts = [
        f"---\n{data.to_yaml()}\n---\n",
        f"# {name}\n",
        f"{base_text} compressed with llmshrink.",
    ]
    if manifest.get("description"):
        parts.append(f"\n{manifest['description']}")
    parts += _metrics_section(manifest.get("metrics"), manifest.get("evaluation", {}).get("perplexity"))
    parts += _passes_section(manifest.get("passes"))
    parts += [
        "\n## How to load\n",
        "With llmshrink:\n\n```python\nimport llmshrink\n\nmodel = llmshrink.load(\"path/to/this/dir\")\n```\n",
        "Without llmshrink (the compressed layers are rebuilt by the remote code in this folder):\n",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/dir\", trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/dir\")\n```\n",
        "## Recipe\n",
        f"```yaml\n{recipe_text.rstrip()}\n```\n",
    ]
    return "\n".join(parts)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def _metrics_section(metrics: Any, protocol: dict | None) -> list[str]:
    if not isinstance(metrics, dict) or not metrics.get("compressed"):
        return []
    rows = comparison_rows(metrics.get("base") or {}, metrics["compressed"])
    table = ["| metric | base | compressed | ratio |", "|---|---:|---:|---:|"]
    table += [f"| {' | '.join(row)} |" for row in rows]
    return ["\n## Metrics\n", *table] + ([f"\n{protocol_line(protocol)}"] if protocol else [])


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
