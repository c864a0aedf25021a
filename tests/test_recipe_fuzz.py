"""Fuzzing: recipes mutated from every shipped recipes/*.yaml never end in a traceback.

Each shipped recipe is first pointed at a tiny random model (GPT-2 for the GPT-2 recipe, else Llama) and tiny
data, with its steps and token counts capped and its SmolLM2-sized settings fitted to 2 blocks (`tiny_recipe`).
Then 30 seeded mutations of each (14 recipes: 420 recipes) go through `llmshrink validate` in-process: junk
values, other plausible numbers, wrong types, unknown, misspelled and deleted keys, invalid regexes in
`targets`, broken YAML. A rejected recipe must exit 2 with at most two lines on stderr. Of the accepted ones,
6 per shipped recipe (seeded sample; 80-84 applies in all, ~1 s each, as long as each recipe keeps >= 6 valid
mutants whose model is still the tiny one) are applied after their counts are capped again, and must exit 0,
or 2 with one error line after any progress bars: a pass may refuse a valid recipe on this model, but exit 1
(an unexpected exception) is a bug. A few mutants, and one whole apply, also go through the real console
entry in a subprocess. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import WORDS, tiny_gpt2, tiny_llama, tiny_tokenizer

from llmshrink.cli import main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
MUTATIONS_PER_RECIPE = 30
APPLY_PER_RECIPE = 6
# key -> the most a tiny apply may use (ints only; smaller values are kept)
CAPS = {"steps": 2, "steps_per_round": 1, "prune_steps": 2, "calibration_tokens": 64,
        "eval_tokens": 32, "iters": 10, "search_iters": 3, "search_restarts": 1, "n_iter_max": 10, "power_iters": 1,
        "batch_size": 2, "seq_len": 16, "max_new_tokens": 4, "max_tokens": 256, "prompt_tokens": 4,
        "new_tokens": 2, "repeats": 1, "warmup_steps": 0, "limit": 2, "window": 32, "stride": 16, "eval_every": 1,
        "save_every": 1, "group_size": 2, "tokens": 256, "sample_tokens": 16}
JUNK = [None, "", "junk", "1e3", -1, 0, 0.5, 3, 1e-9, 10**9, True, [], {}, [1, "x"], {"a": 1}, "~", "null",
        "../elsewhere", "\u00e9\u6f22", float("nan")]
BAD_REGEXES = [".*mlp(", "[", "(?P<x", "*", "a{2,1}", "\\", "(?<=a+)b", "model\\.layers\\.(\\d+"]
KINDS = ["junk"] * 5 + ["number"] * 4 + ["wrong_type"] * 3 + ["unknown_key"] * 2 + ["misspell"] * 3 + \
        ["delete"] * 7 + ["regex"] * 2 + ["broken_yaml"] * 4
assert len(KINDS) == MUTATIONS_PER_RECIPE
PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[")  # a tqdm bar
APPLIED: list[str] = []  # "recipe #n: exit code" of every apply, over the module (the docstring's count)
FUZZED: set[str] = set()  # shipped recipes whose mutants were all validated


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random Llama and GPT-2 folders, a text file and a dialogue .jsonl, shared by every apply."""
    root = tmp_path_factory.mktemp("fuzz")
    for name, make in (("tiny-llama", tiny_llama), ("tiny-gpt2", tiny_gpt2)):
        make().save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS[:30]) for _ in range(12)) for _ in range(120)) + "\n")
    dialogues = root / "dialogues.jsonl"
    dialogues.write_text("".join(json.dumps({"dialogue": " ".join(rng.choice(WORDS) for _ in range(10)),
                                             "summary": " ".join(rng.choice(WORDS) for _ in range(4))}) + "\n"
                                 for _ in range(30)))
    return {"llama": str(root / "tiny-llama"), "gpt2": str(root / "tiny-gpt2"), "text": str(text),
            "dialogues": str(dialogues)}


def shrink(node, caps=CAPS):
    """Cap every count in place (recursively) so that an apply takes ~1 s."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in list(items):
        if key in caps and isinstance(value, int) and not isinstance(value, bool) and value > caps[key]:
            node[key] = caps[key]
        else:
            shrink(value, caps)


# Settings sized for SmolLM2's 30 blocks and 576x1536 MLPs -> what fits the tiny Llama's 2 blocks and 64x192 MLPs,
# so that the applies run every stage instead of stopping at a refused first one.
FIT = {"keep": lambda v: 1 if isinstance(v, int) else v, "unique_blocks": lambda v: 1, "select_layers": lambda v: 1,
       "layers": lambda v: [0, 1], "a_shape": lambda v: [8, 8], "shape": lambda v: {192: [12, 16], 64: [8, 8]}}


def fit(node) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in list(items):
        if key in FIT and value is not None:
            node[key] = FIT[key](value)
        else:
            fit(value)


def tiny_recipe(path: Path, tiny: dict) -> dict:
    """The shipped recipe on a tiny model (GPT-2 for GPT-2's recipe, else Llama) and tiny data, capped, its
    output relative to the current directory."""
    raw = yaml.safe_load(path.read_text())
    raw["model"] = {"id": tiny["gpt2" if raw["model"]["id"].startswith("gpt2") else "llama"]}
    raw["device"] = "cpu"
    data = raw.get("data") or {}
    if data.get("source") == "mix":  # the teacher samples come from the tiny model; the corpus is the tiny text
        data = data.setdefault("corpus", {})
    data.pop("config", None)
    data["source"] = tiny["dialogues"] if data.get("template") else tiny["text"]
    raw.setdefault("data", data)
    evaluate = raw.setdefault("evaluate", {})
    evaluate["memory"] = False  # a fresh process per model: tests/test_apply_evaluate.py covers it
    perplexity = evaluate.get("perplexity")
    for spec in perplexity if isinstance(perplexity, list) else [perplexity] if perplexity else []:
        spec["data"] = {"source": tiny["text"], "max_tokens": 256}
    if evaluate.get("generation"):
        evaluate["generation"]["data"] = tiny["dialogues"]
        evaluate["generation"]["limit"] = 2
    raw["output"] = {"dir": "out"}
    if "gpt2" not in raw["model"]["id"]:
        fit(raw)
    shrink(raw)
    return raw


def paths(node, prefix=()):
    """Every (path, value) below node, containers included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield prefix + (key,), value
        yield from paths(value, prefix + (key,))


def parent(root, path):
    for key in path[:-1]:
        root = root[key]
    return root


def typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    edits = [word[:i] + word[i + 1:], word[:i] + rng.choice("aeioux_") + word[i:], word + "s",
             word[:i] + word[i:].upper()]
    if len(word) > 1:
        j = min(i, len(word) - 2)
        edits.append(word[:j] + word[j + 1] + word[j] + word[j + 2:])
    return next((e for e in rng.sample(edits, len(edits)) if e and e != word), word + "x")


def other_type(value, rng: random.Random):
    if isinstance(value, bool):
        return rng.choice(["maybe", 2, [value]])
    if isinstance(value, (int, float)):
        return rng.choice([f"{value}x", [value], {"value": value}, "ten"])
    if isinstance(value, str):
        return rng.choice([7, 0.25, [value], {value: 1}, False])
    if isinstance(value, list):
        return rng.choice([value[0] if value else 1, ",".join(map(str, value)), {"items": value}])
    if isinstance(value, dict):
        return rng.choice([list(value), "text", 42, [value]])
    return rng.choice([{}, [], "x"])


def mutate(raw: dict, kind: str, rng: random.Random) -> tuple[str, str]:
    """(description, YAML text) of one mutation of `raw` (not modified)."""
    raw = copy.deepcopy(raw)
    found = list(paths(raw))
    if kind == "junk":
        path, _ = rng.choice(found)
        value = rng.choice(JUNK)
        parent(raw, path)[path[-1]] = value
        what = f"{'.'.join(map(str, path))} = {value!r}"
    elif kind == "number":  # a plausible number where one is expected: these mostly validate, then run
        numbers = [(p, v) for p, v in found if isinstance(v, (int, float)) and not isinstance(v, bool)]
        path, value = rng.choice(numbers or found)
        parent(raw, path)[path[-1]] = new = rng.choice([1, 2, 0.1, 0.99, value + 1, value * 2, 0])
        what = f"{'.'.join(map(str, path))}: {value!r} -> {new!r}"
    elif kind == "wrong_type":
        path, value = rng.choice(found)
        parent(raw, path)[path[-1]] = new = other_type(value, rng)
        what = f"{'.'.join(map(str, path))}: {value!r} -> {new!r}"
    elif kind == "unknown_key":
        dicts = [((), raw)] + [(p, v) for p, v in found if isinstance(v, dict)]
        path, node = rng.choice(dicts)
        node[rng.choice(["bogus", "extra_setting", "lr_schedule", "targets2"])] = rng.choice([1, "x", None])
        what = f"unknown key under {'.'.join(map(str, path)) or '(top)'}"
    elif kind == "misspell":
        path, _ = rng.choice([(p, v) for p, v in found if isinstance(p[-1], str)])
        node, key = parent(raw, path), path[-1]
        new_key = typo(key, rng)
        items = [(new_key if k == key else k, v) for k, v in node.items()]
        node.clear()
        node.update(items)
        what = f"{'.'.join(map(str, path))} -> {new_key}"
    elif kind == "delete":
        path, _ = rng.choice(found)
        del parent(raw, path)[path[-1]]
        what = f"deleted {'.'.join(map(str, path))}"
    elif kind == "regex":
        targets = [p for p, v in found if p[-1] == "targets" and isinstance(v, str)]
        bad = rng.choice(BAD_REGEXES)
        if targets:
            path = rng.choice(targets)
        else:  # a pass without targets in the shipped recipe: add one to its first stage
            stage = raw["stages"][0]
            (name, body), = stage.items()
            stage[name] = body = body or {}
            path = ("stages", 0, name, "targets")
        parent(raw, path)[path[-1]] = bad
        what = f"{'.'.join(map(str, path))} = {bad!r}"
    else:
        return broken_yaml(yaml.safe_dump(raw, sort_keys=False), rng)
    return f"{kind}: {what}", yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def broken_yaml(text: str, rng: random.Random) -> tuple[str, str]:
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    how = rng.choice(["truncate", "bracket", "tab", "quote", "colon", "indent", "binary", "empty", "list"])
    if how == "truncate":
        text = text[: rng.randrange(1, len(text))]
    elif how == "bracket":
        lines[i] += " [unclosed"
    elif how == "tab":
        lines[i] = "\t" + lines[i]
    elif how == "quote":
        lines[i] = lines[i].replace(": ", ": 'open ", 1) if ": " in lines[i] else lines[i] + " 'open"
    elif how == "colon":
        lines[i] = lines[i] + ": : x"
    elif how == "indent":
        lines[i] = " " + lines[i]
    elif how == "binary":
        return f"broken_yaml: {how}", "name: x\n\udcff\udcfe: \x00\n"
    elif how == "empty":
        return f"broken_yaml: {how}", ""
    else:
        return f"broken_yaml: {how}", "- " + "\n- ".join(lines[:3]) + "\n"
    if how not in ("truncate",):
        text = "\n".join(lines) + "\n"
    return f"broken_yaml: {how} at line {i + 1}", text


def cases(recipe: Path, tiny: dict) -> list[tuple[str, str]]:
    base = tiny_recipe(recipe, tiny)
    return [mutate(base, kind, random.Random(f"{recipe.stem}:{n}")) for n, kind in enumerate(KINDS)]


def write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # the "binary" mutation keeps its raw bytes


def run(capfd, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse only; nothing here should reach it
        code = exit_.code
    out, err = capfd.readouterr()
    return code, out, err


def verdict(code: int, err: str, ok_codes=(0, 2)) -> str | None:
    """None if fine, else what is wrong: a traceback, exit 1, or a rejection longer than two lines
    (progress bars, which an apply shows on stderr before it fails, are not counted)."""
    lines = [line for line in err.replace("\r", "\n").strip().splitlines() if line.strip() and not PROGRESS.search(line)]
    if "Traceback" in err or code not in ok_codes:
        return f"exit {code}: {' | '.join(lines[-3:])}"
    if code == 2 and (len(lines) > 2 or not lines or not lines[-1].startswith("llmshrink: error: ")):
        return f"exit 2 with {len(lines)} stderr lines: {' | '.join(lines[-3:])}"
    return None


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_mutated_recipes_validate_or_apply_without_a_traceback(recipe, tiny, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a mutated relative output.dir lands here
    FUZZED.add(recipe.stem)
    failures, accepted = [], []
    for n, (what, text) in enumerate(cases(recipe, tiny)):
        path = tmp_path / f"m{n}.yaml"
        write(path, text)
        code, out, err = run(capfd, ["validate", str(path)])
        if (bad := verdict(code, err)) is not None:
            failures.append(f"validate {recipe.stem} #{n} ({what}): {bad}")
        elif code == 0:
            assert out.strip().startswith(f"{path}: ok"), out
            accepted.append((n, what, text))
    for n, what, text in random.Random(recipe.stem).sample(accepted, min(APPLY_PER_RECIPE, len(accepted))):
        raw = yaml.safe_load(text)
        if (raw.get("model") or {}).get("id", "builtin:") not in (tiny["llama"], tiny["gpt2"]):
            continue  # the built-in (135M) model would be fetched: not a tiny apply
        shrink(raw)
        raw.setdefault("evaluate", {})["memory"] = False
        path = tmp_path / f"m{n}-apply.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        (tmp_path / f"a{n}").mkdir()
        monkeypatch.chdir(tmp_path / f"a{n}")  # each apply its own relative output.dir
        code, _, err = run(capfd, ["apply", str(path)])
        APPLIED.append(f"{recipe.stem} #{n}: exit {code}")
        if (bad := verdict(code, err)) is not None:
            failures.append(f"apply {recipe.stem} #{n} ({what}): {bad}")
    print(f"\n{recipe.stem}: {len(accepted)} of {MUTATIONS_PER_RECIPE} mutants valid; applied so far: {APPLIED}")
    assert not failures, "\n".join(failures)


def test_enough_mutants_were_applied():
    """Runs after the parametrized test above (file order): the docstring's lower bound on applies."""
    if len(FUZZED) < len(RECIPES):
        pytest.skip("the fuzz test ran on some of the shipped recipes only")
    assert len(APPLIED) >= 60, APPLIED


def test_mutants_through_the_console_entry(tiny, tmp_path):
    """The installed `llmshrink` script, in a fresh process: same exit codes, no traceback."""
    script = Path(sys.executable).with_name("llmshrink")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "llmshrink"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torch's default of a thread per core crawls on a shared CPU
    kinds = {kind: KINDS.index(kind) for kind in KINDS}  # the first mutation of each kind
    picked = [(RECIPES[i % len(RECIPES)], kinds[kind]) for i, kind in enumerate(kinds)]
    for recipe, n in picked:
        what, text = cases(recipe, tiny)[n]
        path = tmp_path / f"{recipe.stem}-{n}.yaml"
        write(path, text)
        done = subprocess.run([*command, "validate", str(path)], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=120)
        assert verdict(done.returncode, done.stderr) is None, (what, done.returncode, done.stderr)
    path = tmp_path / "tiny.yaml"  # and one whole apply, unmutated
    path.write_text(yaml.safe_dump(tiny_recipe(RECIPES[0], tiny), sort_keys=False))
    done = subprocess.run([*command, "apply", str(path)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "out" / "llmshrink.json").is_file()
