"""The perplexity protocols of the checkpoints `llmshrink compare` reads: grouped, described, checked."""

from __future__ import annotations

import json

from llmshrink.eval.report import protocol_line

# Protocol fields that describe the model measured, not how it was measured.
_PROTOCOL_IGNORED = {"tied_embeddings"}


def protocols_of(manifests: list[dict], names: list[str]) -> dict[str, dict]:
    """Each checkpoint's perplexity protocol as its manifest has it (none when it measured no perplexity)."""
    protocols = {}
    for manifest, name in zip(manifests, names, strict=True):
        evaluation = manifest.get("evaluation")
        proto = evaluation.get("perplexity") if isinstance(evaluation, dict) else None
        if isinstance(proto, dict) and proto:
            protocols[name] = proto
    return protocols


def out_of_domain(manifests: list[dict]) -> str | None:
    """The first perplexity dataset the checkpoints' recipes marked `domain: out`, if any."""
    for manifest in manifests:
        evaluation = manifest.get("evaluation")
        proto = evaluation.get("perplexity") if isinstance(evaluation, dict) else None
        datasets = proto.get("datasets") if isinstance(proto, dict) else None
        for name, own in (datasets if isinstance(datasets, dict) else {}).items():
            if isinstance(own, dict) and own.get("domain") == "out":
                return str(name)
    return None


def group_protocols(protocols: dict[str, dict]) -> list[tuple[dict, list[str]]]:
    """(method, names) per distinct way of measuring; fields that describe the model are left out."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for name, proto in protocols.items():
        method = {k: v for k, v in proto.items() if k not in _PROTOCOL_IGNORED}
        groups.setdefault(json.dumps(method, sort_keys=True, default=str), (method, []))[1].append(name)
    return list(groups.values())


def protocol_text(method: dict) -> str:
    # report.protocol_line without its prefix and its tied-embeddings part (a property of each model)
    datasets = method.get("datasets")
    if isinstance(datasets, dict) and datasets:  # several named datasets: each its own protocol
        return "; ".join(f"{name}{' (out-of-domain)' if own.get('domain') == 'out' else ''}: {protocol_text(own)}"
                         for name, own in datasets.items() if isinstance(own, dict))
    text = protocol_line(method).removeprefix("Perplexity protocol: ")
    return text.rsplit(", tied embeddings:", 1)[0]


def protocol_warnings(protocols: dict[str, dict]) -> list[str]:
    """Warn when the checkpoints measured perplexity differently: their perplexities are not comparable."""
    protos = [p for p, _ in group_protocols(protocols)]
    if len(protos) < 2:
        return []
    fields = sorted({k for p in protos for k in p if any(q.get(k) != p.get(k) for q in protos)})
    return [f"the checkpoints measured perplexity with different protocols (differing: {', '.join(fields)}), "
            "so their perplexities are not comparable; see 'Perplexity protocol' below."]
