"""`compare`: Pareto set, table, JSON and plot from hand-written checkpoint manifests (no model needed)."""

from __future__ import annotations

import json
import re

import pytest

from llmshrink.compare import compare, flatten_metrics, higher_is_better, pareto_flags
from llmshrink.errors import LlmshrinkError

PROTOCOL = {"dataset": "builtin:shakespeare", "config": None, "split": "test", "max_tokens": 4096,
            "window": 512, "stride": 256, "tokens": 4096, "bos": False, "tokens_scored": 4095,
            "tied_embeddings": True}
BASE = {"params": 124_000_000, "size_bytes": 500_000_000, "perplexity": 30.0, "decode_tokens_per_s": 20.0,
        "prefill_ms": 100.0, "load_seconds": 0.5, "lm_eval": {"hellaswag": {"acc,none": 0.30}}}

# name -> (passes, size MB, perplexity, hellaswag acc). By hand, on size and perplexity (lower better):
# prune (450, 50) is beaten by kron (400, 40); the base (500, 30) is on the front: nothing is as good.
# On accuracy (higher better): the base (500, .30) is beaten by prune (450, .31) and kron (400, .28)
# by lowrank (300, .29), so the front flips to quant, lowrank, prune.
CHECKPOINTS = {
    "kron": (["kronecker", "distill"], 400, 40.0, 0.28),
    "lowrank": (["low_rank"], 300, 45.0, 0.29),
    "prune": (["prune_ffn", "distill"], 450, 50.0, 0.31),
    "quant": (["quantize"], 150, 60.0, 0.25),
}


def write_checkpoint(directory, name, passes, size_mb, ppl, acc, base=None, protocol=None, decode=22.0):
    directory.mkdir(parents=True)
    compressed = {"params": int(size_mb * 250_000), "size_bytes": size_mb * 1_000_000, "perplexity": ppl,
                  "decode_tokens_per_s": decode, "prefill_ms": 90.0, "compress_seconds": 100.0,
                  "load_seconds": 0.4, "lm_eval": {"hellaswag": {"acc,none": acc, "alias": "hellaswag"}}}
    manifest = {"name": name, "base_model": {"id": "gpt2", "revision": "main"},
                "passes": [{"pass": p, "config": {}, "record": {}, "seconds": 1.0} for p in passes],
                "stages": [], "metrics": {"base": base or BASE, "compressed": compressed},
                "evaluation": {"perplexity": protocol or PROTOCOL}}
    (directory / "llmshrink.json").write_text(json.dumps(manifest))
    return directory


def md_row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def silent(_: str) -> None:
    pass


@pytest.fixture
def checkpoints(tmp_path):
    # the base's decode speed differs in every run (timing noise): that alone is no disagreement
    return [write_checkpoint(tmp_path / name, name, passes, size, ppl, acc,
                             base={**BASE, "decode_tokens_per_s": 20.0 + i})
            for i, (name, (passes, size, ppl, acc)) in enumerate(CHECKPOINTS.items())]


def test_pareto_flags_by_hand():
    points = [(1.0, 1.0), (1.0, 1.0), (2.0, 2.0), None, (2.0, 0.5), (3.0, float("nan"))]
    # identical points do not dominate each other; missing or nan coordinates are not ranked
    assert pareto_flags(points, higher_better=False) == [True, True, False, None, True, None]
    assert pareto_flags(points, higher_better=True) == [True, True, True, None, False, None]


@pytest.mark.parametrize("metric, expected", [
    ("perplexity", False), ("prefill_ms", False), ("compress_seconds", False), ("size_bytes", False),
    ("lm_eval/wikitext/word_perplexity,none", False), ("lm_eval/pile/bits_per_byte,none", False),
    ("lm_eval/hellaswag/acc_stderr,none", False), ("decode_tokens_per_s", True),
    ("lm_eval/hellaswag/acc_norm,none", True), ("lm_eval/gsm8k/exact_match,strict-match", True),
    ("generation/rougeLsum", True), ("generation/bleu", True), ("generation/length", None),
    ("macs_per_token", False), ("perplexity_by_dataset/python_docs", False),
])
def test_direction_rule(metric, expected):
    assert higher_is_better(metric) is expected


def test_flatten_metrics_keeps_numbers_and_nests_with_slashes():
    flat = flatten_metrics({"params": 5, "ok": True, "note": "x", "generation": {"rouge1": 0.25},
                            "lm_eval": {"arc": {"acc,none": 0.5, "alias": "arc"}}})
    assert flat == {"params": 5, "lm_eval/arc/acc,none": 0.5, "generation/rouge1": 0.25}


def test_compare_perplexity_writes_table_json_and_plot(checkpoints, tmp_path):
    out = tmp_path / "cmp"
    lines = []
    data = compare(checkpoints, out, log=lines.append)

    # no temp files left behind
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json", "comparison.md", "pareto.png"]
    assert data == json.loads((out / "comparison.json").read_text())
    assert data["metric"] == "perplexity" and data["higher_is_better"] is False and data["x"] == "size_bytes"
    assert data["pareto"] == ["quant", "lowrank", "kron", "base (gpt2)"]  # by size; prune is dominated
    rows = {r["name"]: r for r in data["rows"]}
    assert [r["name"] for r in data["rows"]] == ["base (gpt2)", "kron", "lowrank", "prune", "quant"]
    assert {n: r["pareto"] for n, r in rows.items()} == {"base (gpt2)": True, "kron": True, "lowrank": True,
                                                         "prune": False, "quant": True}
    kron = rows["kron"]
    assert kron["kind"] == "checkpoint" and kron["path"] == str(checkpoints[0])
    assert kron["passes"] == ["kronecker", "distill"]
    assert kron["metrics"]["size_bytes"] == 400_000_000
    assert kron["metrics"]["lm_eval/hellaswag/acc,none"] == 0.28
    assert kron["ratios"]["size_bytes"] == pytest.approx(0.8)
    assert kron["ratios"]["perplexity"] == pytest.approx(40 / 30)
    assert kron["ratios"]["decode_tokens_per_s"] == pytest.approx(22 / 20)  # vs its own run's base (20.0)
    assert rows["quant"]["ratios"]["decode_tokens_per_s"] == pytest.approx(22 / 23)  # its base ran at 23.0
    assert rows["base (gpt2)"]["ratios"] == {} and rows["base (gpt2)"]["metrics"]["perplexity"] == 30.0
    assert data["warnings"] == [] and data["notes"] == []  # only the base's timings differed
    assert data["protocols"]["kron"] == PROTOCOL

    md = (out / "comparison.md").read_text()
    assert md_row("name", "passes", "params", "size (MB)", "size ratio", "perplexity", "ppl ratio",
                  "decode tok/s", "speedup", "compress (s)", "Pareto") in md
    assert md_row("kron", "kronecker + distill", "100,000,000", "400.00", "0.80x", "40.00", "1.33x", "22.0",
                  "1.10x", "100.0", "**yes**") in md
    assert md_row("prune", "prune_ffn + distill", "112,500,000", "450.00", "0.90x", "50.00", "1.67x", "22.0",
                  "1.00x", "100.0", "no") in md
    assert md_row("base (gpt2)", "(base)", "124,000,000", "500.00", "-", "30.00", "-", "20.0", "-", "-",
                  "**yes**") in md
    assert "![size on disk vs perplexity](pareto.png)" in md and "Warning" not in md
    # every metric, the known ones first
    assert md_row("name", "kind", "params", "size (MB)", "perplexity", "decode_tokens_per_s", "prefill_ms",
                  "load_seconds", "compress_seconds", "lm_eval/hellaswag/acc,none") in md
    assert md_row("kron", "checkpoint", "100,000,000", "400.00", "40.00", "22.0", "90.0", "0.40", "100.0",
                  "0.28") in md
    assert ("- kron, lowrank, prune, quant: dataset builtin:shakespeare (test), window 512, stride 256, "
            "4,096 tokens, no BOS\n") in md
    assert lines[-2:] == ["Pareto-optimal on size and perplexity: quant, lowrank, kron, base (gpt2)",
                          f"wrote {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'pareto.png'}"]

    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image

    image = matplotlib.image.imread(out / "pareto.png")
    assert image.shape == (480, 700, 4) and image[..., :3].std() > 0.05  # 7x4.8 in at 100 dpi, not blank


def test_accuracy_metric_flips_the_direction(checkpoints, tmp_path):
    data = compare(checkpoints, tmp_path / "acc", metric="lm_eval/hellaswag/acc,none", log=silent)
    assert data["higher_is_better"] is True
    assert data["pareto"] == ["quant", "lowrank", "prune"]
    # base, kron, lowrank, prune, quant
    assert [r["pareto"] for r in data["rows"]] == [False, False, True, True, True]
    md = (tmp_path / "acc" / "comparison.md").read_text()
    assert "lm_eval/hellaswag/acc,none (higher is better)" in md
    assert "| lm_eval/hellaswag/acc,none | lm_eval/hellaswag/acc,none ratio |" in md
    assert md_row("kron", "kronecker + distill", "100,000,000", "400.00", "0.80x", "40.00", "1.33x", "0.28",
                  "0.93x", "22.0") in md


def test_without_base_and_explicit_direction(checkpoints, tmp_path):
    data = compare(checkpoints, tmp_path / "nb", include_base=False, log=silent)
    assert [r["name"] for r in data["rows"]] == ["kron", "lowrank", "prune", "quant"]
    assert data["pareto"] == ["quant", "lowrank", "kron"]
    # an explicit direction overrides the rule: with lower accuracy "better", quant dominates everything
    data = compare(checkpoints, tmp_path / "x", metric="lm_eval/hellaswag/acc,none", higher_better=False,
                   log=silent)
    assert data["pareto"] == ["quant"]


def test_protocol_and_base_disagreement_are_reported(tmp_path):
    a = write_checkpoint(tmp_path / "a", "kron", ["kronecker"], 400, 40.0, 0.3)
    # tied_embeddings describes the model, not the method: only the window counts as a difference
    b = write_checkpoint(tmp_path / "b", "kron", ["low_rank"], 300, 45.0, 0.3,
                         base={**BASE, "perplexity": 31.5},
                         protocol={**PROTOCOL, "window": 256, "tied_embeddings": False})
    lines = []
    data = compare([a, b], tmp_path / "out", log=lines.append)
    # duplicate names get the directory name
    assert [r["name"] for r in data["rows"]] == ["base (gpt2)", "kron (a)", "kron (b)"]
    assert data["warnings"] == [
        "the checkpoints measured perplexity with different protocols (differing: window), "
        "so their perplexities are not comparable; see 'Perplexity protocol' below."]
    assert data["notes"] == [
        "base gpt2: perplexity differs between checkpoints (kron (a): 30.00, kron (b): 31.50); "
        "the base row shows kron (a)'s, and each checkpoint's ratios use its own run's base."]
    assert data["rows"][2]["ratios"]["perplexity"] == pytest.approx(45 / 31.5)
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert md.startswith("# llmshrink comparison\n\n> **Warning:** the checkpoints measured perplexity")
    assert "- kron (a): dataset builtin:shakespeare (test), window 512," in md
    assert "- kron (b): dataset builtin:shakespeare (test), window 256," in md
    assert lines[0].startswith("warning: the checkpoints measured perplexity with different protocols")


def test_same_name_in_same_named_dirs_uses_the_path(tmp_path):
    a = write_checkpoint(tmp_path / "x" / "run", "kron", [], 400, 40.0, 0.3)
    b = write_checkpoint(tmp_path / "y" / "run", "kron", [], 300, 45.0, 0.3)
    data = compare([a, b], tmp_path / "out", include_base=False, log=silent)
    assert [r["name"] for r in data["rows"]] == [f"kron ({a})", f"kron ({b})"]  # the dir names clash too
    assert "| (none) |" in (tmp_path / "out" / "comparison.md").read_text()


def test_missing_metric_rows_are_left_out_of_the_front(tmp_path):
    a = write_checkpoint(tmp_path / "a", "a", [], 400, 40.0, 0.3)
    b = write_checkpoint(tmp_path / "b", "b", [], 300, 45.0, 0.3)
    manifest = json.loads((b / "llmshrink.json").read_text())
    del manifest["metrics"]["compressed"]["perplexity"]
    (b / "llmshrink.json").write_text(json.dumps(manifest))
    data = compare([a, b], tmp_path / "out", include_base=False, log=silent)
    assert [r["pareto"] for r in data["rows"]] == [True, None] and data["pareto"] == ["a"]
    assert data["notes"] == ["left out of the Pareto front and the plot (no size_bytes or perplexity): b"]


def test_errors_name_the_path_and_what_is_allowed(checkpoints, tmp_path):
    def error(*args, **kwargs) -> str:
        with pytest.raises(LlmshrinkError) as info:
            compare(*args, log=silent, **kwargs)
        return str(info.value)

    out = tmp_path / "out"
    assert error([tmp_path / "nope"], out) == (
        f"{tmp_path / 'nope'}: does not exist; pass checkpoint directories written by `llmshrink apply`")
    (tmp_path / "file.txt").write_text("x")
    assert error([tmp_path / "file.txt"], out) == (
        f"{tmp_path / 'file.txt'}: is not a directory; pass checkpoint directories written by "
        "`llmshrink apply`")
    (tmp_path / "empty").mkdir()
    assert error([tmp_path / "empty"], out) == (
        f"{tmp_path / 'empty'}: no llmshrink.json; not a checkpoint directory written by `llmshrink apply`")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "llmshrink.json").write_text(json.dumps({"name": "bad", "metrics": {"base": {}}}))
    assert error([tmp_path / "bad"], out) == (
        f"{tmp_path / 'bad' / 'llmshrink.json'}: metrics: missing or incomplete; expected "
        "{'base': {...}, 'compressed': {...}} as written by `llmshrink apply`")
    (tmp_path / "bad" / "llmshrink.json").write_text("{")
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'bad' / 'llmshrink.json'))}: not valid JSON \(.+\)",
                        error([tmp_path / "bad"], out))
    assert error([], out) == "compare: no checkpoint directories given; pass at least one"
    assert error([checkpoints[0], tmp_path / "kron" / ".." / "kron"], out) == (
        f"compare: {tmp_path / 'kron' / '..' / 'kron'} is given twice (also as {checkpoints[0]}); "
        "pass each checkpoint once")
    assert error(checkpoints, out, metric="acc") == (
        "metric: 'acc' is in no row's metrics; available: params, size_bytes, perplexity, "
        "decode_tokens_per_s, prefill_ms, load_seconds, compress_seconds, lm_eval/hellaswag/acc,none")
    assert error(checkpoints, out, metric="size_bytes") == (
        "metric: 'size_bytes' is already the x axis; choose a quality metric such as perplexity")
    assert error(checkpoints, tmp_path / "file.txt") == (
        f"output: {tmp_path / 'file.txt'} is a file; pass a directory to write the comparison into")
    assert not out.exists()  # nothing written on bad input


def test_unknown_direction_needs_to_be_given(tmp_path):
    a = write_checkpoint(tmp_path / "a", "a", [], 400, 40.0, 0.3)
    manifest = json.loads((a / "llmshrink.json").read_text())
    manifest["metrics"]["compressed"]["generation"] = {"length": 12.0}
    (a / "llmshrink.json").write_text(json.dumps(manifest))
    with pytest.raises(LlmshrinkError) as info:
        compare([a], tmp_path / "out", metric="generation/length", log=silent)
    assert str(info.value) == (
        "metric: cannot tell whether higher or lower is better for 'generation/length'; "
        "say which (--higher-is-better or --lower-is-better)")
    data = compare([a], tmp_path / "out", metric="generation/length", higher_better=True, log=silent)
    assert data["higher_is_better"] is True and data["pareto"] == ["a"]
    assert data["notes"] == [
        "left out of the Pareto front and the plot (no size_bytes or generation/length): base (gpt2)"]


def test_encoders_are_compared_on_their_task_score_and_examples_per_second(tmp_path):
    base = {"params": 1000, "size_bytes": 4e6, "accuracy": 0.8, "examples_per_s": 200.0}
    runs = {"int8": (2e6, 0.8, 450.0), "pruned": (3e6, 0.82, 400.0), "tiny": (3.5e6, 0.7, 300.0)}
    paths = []
    for name, (size, acc, speed) in runs.items():
        path = tmp_path / name
        path.mkdir()
        manifest = {"name": name, "base_model": {"id": "minilm"}, "stages": [],
                    "passes": [{"pass": "finetune", "config": {}, "record": {}, "seconds": 1.0}],
                    "metrics": {"base": base, "compressed": {"params": 900, "size_bytes": size, "accuracy": acc,
                                                             "examples_per_s": speed, "compress_seconds": 5.0}},
                    "evaluation": {"perplexity": {}}}
        (path / "llmshrink.json").write_text(json.dumps(manifest))
        paths.append(path)
    data = compare(paths, tmp_path / "cmp", log=silent)  # the default metric, perplexity, is absent: accuracy
    assert data["metric"] == "accuracy" and data["higher_is_better"] is True
    assert data["pareto"] == ["int8", "pruned"]  # tiny is beaten by int8 (smaller, more accurate)
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| name | passes | params | size (MB) | size ratio | accuracy | accuracy ratio | examples/s | speedup |" in md
    assert md_row("pruned", "finetune", "900", "3.00", "0.75x", "0.8200", "1.02x", "400.0", "2.00x", "5.0",
                  "**yes**") in md
