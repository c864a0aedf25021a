"""Run a recipe: load -> passes in order -> evaluate base and result -> save -> verify reload -> publish.

The engine names no pass: what a pass needs done after the stages (a merge into the weights) or around the
checkpoint (files kept beside it) it does in its lifecycle hooks (passes/base.py), which the engine calls for the
passes that ran.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmshrink import __version__
from llmshrink.checkpoint import move_into_place, write_checkpoint
from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.context import Context
from llmshrink.distill.curves import save_training_curves
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.evaluator import Evaluator
from llmshrink.eval.report import format_table, write_report_md
from llmshrink.eval.size import dir_size
from llmshrink.export.from_recipe import check_runtimes, write_exports
from llmshrink.fileio import atomic_write_text, make_readable
from llmshrink.hub import model_card
from llmshrink.passes.base import Extra, LoadExtra
from llmshrink.planning.planner import Planned, check_planned, planned_recipe
from llmshrink.planning.planner import plan as plan_target
from llmshrink.planning.spec import SCORE_NAMES
from llmshrink.recipe import LoadedRecipe, Recipe
from llmshrink.registry import PassSpec, get_pass, passes_run
from llmshrink.specs import ModelSpec
from llmshrink.stages import parse_stage

# Inside the work folder (work_dir_for): the stages' resumable state, teacher samples (both kept for a rerun
# after a failure), the output being written, the passes' extras (save_extra) until it is, and an existing
# output moved aside by `overwrite` until the new one is in place.
STAGE_PREFIX = "stage-"
SAMPLES_DIR = "teacher-samples"
STAGING_DIR = "output.partial"
EXTRA_PREFIX = "extra-"
PREVIOUS_DIR = "output.previous"
# Beside a target: recipe's checkpoint: the plan as an ordinary recipe, and the measurements it was made from.
PLANNED_RECIPE = "planned_recipe.yaml"
PLAN_FILE = "plan.json"


def run_recipe(loaded: LoadedRecipe, output_dir: str | None = None, log=print, samples_dir: Path | None = None) -> dict:
    """Apply `loaded` end to end; returns the manifest written to <output>/llmshrink.json.

    `samples_dir`: where teacher samples are cached (default: the work folder, gone after success); runs of one
    recipe at several settings (sweep) share one, so that the teacher is sampled once.

    Everything is written under the hidden work folder (work_dir_for) and the output folder appears by
    one rename once complete and verified; a failed or killed run leaves no output folder (and with
    overwrite, the old one in place). The work folder goes on success; on failure only the stages'
    resumable state (stage-*/) and the teacher samples (teacher-samples/) stay, for the rerun.

    Under `accelerate launch` every process runs the stages (training is data-parallel, the other
    passes are deterministic, so all processes hold the same model); only the main process then
    evaluates and saves, and the others return an empty manifest.
    """
    recipe = loaded.recipe
    out_dir = Path(output_dir or recipe.output.dir)
    _check_output_dir(recipe, out_dir, loaded.path)
    work_root = work_dir_for(out_dir)
    if _is_main_process():
        _clear_leftovers(work_root, out_dir)
    try:
        manifest = _run(loaded, out_dir, work_root, log, samples_dir or work_root / SAMPLES_DIR)
    except BaseException:
        if _is_main_process():
            _clear_leftovers(work_root, out_dir)
        raise
    if manifest:
        shutil.rmtree(work_root, ignore_errors=True)
    return manifest


def _run(loaded: LoadedRecipe, out_dir: Path, work_root: Path, log, samples_dir: Path) -> dict:
    from llmshrink.models import load_base_model  # (transformers' auto classes: imported when needed)

    recipe = loaded.recipe
    torch.manual_seed(recipe.seed)
    device = resolve_device(recipe.device)
    check_runtimes(recipe.export)  # before the work, not after it
    step = _Steps(5 + len(loaded.stages) + (recipe.target is not None) + bool(recipe.export))

    model_spec = model_spec_of(recipe)
    log(f"{step()} load {model_spec.id}")
    base_loaded = load_base_model(model_spec, device=device, log=log)  # may download/convert once (cached)
    model, tokenizer = base_loaded.model, base_loaded.tokenizer
    evaluator = Evaluator(recipe, tokenizer, device)

    # A second, timed load gives a fair load time (the first may have converted a GGUF) and the teacher:
    # an untouched copy of the base, evaluated after the stages so that a bad stage fails fast.
    start = time.perf_counter()
    teacher = load_base_model(model_spec, device=device, log=log).model
    load_seconds = time.perf_counter() - start
    teacher.requires_grad_(False).eval()
    ctx = context_for(recipe, model_spec, tokenizer, device, teacher, samples_dir, log)
    if recipe.evaluate.after_each_stage and evaluator.has_quality:
        # passes with inner steps (iterate) report after each
        ctx.evaluate, ctx.evaluate_name = evaluator.quality, evaluator.quality_name

    stages, planned = loaded.stages, None
    if recipe.target is not None:
        log(f"{step()} plan for target {recipe.target.kind} {recipe.target.value:g}")
        planned = plan_target(model, recipe.target, recipe.search, ctx, cache_dir=plan_cache_dir(), log=log)
        planned_stages = [parse_stage(item, str(loaded.path), f"planned stages[{i}]")
                          for i, item in enumerate(planned.stages)]
        stages = planned_stages + stages
        step.total += len(planned_stages)
        if not planned_stages:  # the base meets the budget already
            _check_plan(model, planned, ctx, log)
        torch.manual_seed(recipe.seed)  # the stages start as they would in the emitted recipe

    stage_rows, records = [], []
    with passes_run() as ran:  # the passes that ran, inner ones included, in order: their hooks run below
        for index, stage in enumerate(stages):
            log(f"{step()} {stage.name}")
            ctx.work_dir = work_root / f"{STAGE_PREFIX}{index}-{stage.name}"  # resumable state, kept on failure
            start = time.perf_counter()
            record = get_pass(stage.name).apply(model, stage.config, ctx)
            seconds = time.perf_counter() - start
            row = {"stage": f"{index}:{stage.name}", "seconds": round(seconds, 2), "params": evaluator.params(model)}
            if recipe.evaluate.after_each_stage and evaluator.has_quality:
                name = evaluator.quality_name
                row[name] = evaluator.quality(model)
                log(f"  {name} after {stage.name}: {row[name]:.4g}")
            stage_rows.append(row)
            records.append(
                {"pass": stage.name, "config": stage.config.model_dump(mode="json"), "record": record,
                 "seconds": round(seconds, 3)}
            )
            if planned is not None and index == len(planned.stages) - 1:
                _check_plan(model, planned, ctx, log)

    ctx.work_dir = None
    for spec in ran:  # after every stage, so that what a pass left on the model was used by the later ones
        finalize = spec.hooks.finalize
        if finalize is not None and (summary := finalize(model, ctx)):
            log(f"  {summary}")

    if not _is_main_process():
        log(f"process {os.environ.get('RANK')}: stages done; the main process evaluates and saves")
        return {}

    # The base is the teacher the passes distilled from: the model as loaded, or as a finetune stage left it.
    teacher = ctx.teacher
    log(f"{step()} evaluate base model")
    base = evaluator.measure(teacher, "base", log)
    base["load_seconds"] = load_seconds
    base.update(evaluator.tasks(teacher, "base", log))

    log(f"{step()} evaluate compressed model")
    # The last stage row measured it: a decoder's perplexity, an encoder's primary task score (its other scores
    # came with it: the Evaluator reuses them).
    known = stage_rows[-1].get(evaluator.quality_name) if stage_rows else None
    compressed = evaluator.measure(model, "compressed", log, known=known)
    compressed["compress_seconds"] = sum(row["seconds"] for row in stage_rows)
    compressed.update(evaluator.tasks(model, "compressed", log))
    manifest = {
        "llmshrink_version": __version__,
        "name": recipe.name,
        "base_model": {
            "id": base_loaded.model_id,
            "revision": base_loaded.revision,
            "source": base_loaded.source,
            "notes": base_loaded.notes,
            "tie_word_embeddings": bool(getattr(teacher.config, "tie_word_embeddings", False)),
        },
        "passes": records,
        "stages": stage_rows,
        "metrics": {"base": base, "compressed": compressed},
        "evaluation": {"perplexity": evaluator.protocol, **evaluator.protocols},
    }

    if planned is not None:
        manifest["plan"] = {key: value for key, value in planned.record.items() if key != "measurements"}
    log(f"{step()} save {out_dir}")
    staging = work_root / STAGING_DIR
    extras = _write_staging(model, tokenizer, ran, staging, work_root, manifest, loaded, evaluator)
    if planned is not None:  # the plan as an ordinary recipe, and every measurement behind it
        atomic_write_text(staging / PLANNED_RECIPE, planned_recipe(loaded.text, planned.stages))
        atomic_write_text(staging / PLAN_FILE, json.dumps(planned.record, indent=1) + "\n")

    log(f"{step()} verify reload")
    _verify(model, extras, staging, manifest, evaluator, device, out_dir)
    compressed["size_bytes"] = dir_size(staging, weights_only=True)
    if recipe.evaluate.memory:
        doing = "generating" if evaluator.encoder is None else "one forward"
        log(f"  peak RAM: loading and {doing}, each model in a fresh process")
        base.update(evaluator.memory(model_spec, device))
        compressed.update(evaluator.memory(staging, device))
        manifest["evaluation"]["memory"] = evaluator.protocols["memory"]
    if recipe.export:  # from the verified checkpoint; after its size and memory, which they are not part of
        log(f"{step()} export {', '.join(spec.folder for spec in recipe.export)}")
        manifest["exports"] = write_exports(recipe.export, staging, work_root, out_dir, log)
    _finish_staging(staging, manifest, loaded, type(model).__name__, base_loaded.notes, evaluator)

    move_into_place(staging, out_dir, recipe.output.overwrite, aside=work_root / PREVIOUS_DIR)
    log("")
    log(format_table(base, compressed))
    log(f"\nsaved {out_dir} (report: {out_dir / 'report.md'})")
    return manifest


def _check_plan(model, planned: Planned, ctx: Context, log) -> None:
    got = check_planned(model, planned, ctx)
    planned.reference = planned.calibration = None  # the base's log-probabilities: 0.2-0.4 GB, not needed again
    log(f"  planned model: {got[planned.unit]:,} {planned.unit} as planned; calibration "
        f"{SCORE_NAMES[planned.record['score']]} {got['loss']:.4f} "
        f"measured jointly ({planned.predicted_loss:.4f} estimated)")


def plan_cache_dir() -> Path:
    """Where plan measurements are cached (under LLMSHRINK_CACHE when set)."""
    from llmshrink.models import cache_root

    return cache_root() / "plans"


def context_for(recipe: Recipe, model_spec: ModelSpec, tokenizer, device: torch.device, teacher, samples_dir: Path,
             log) -> Context:
    return Context(tokenizer=tokenizer, device=device, teacher=teacher, data=recipe.data, seed=recipe.seed, log=log,
                   samples_dir=samples_dir, teacher_fingerprint=model_spec.model_dump_json(),
                   task=recipe.task)


class _Steps:
    """"[i/total]" before each step's log line; a plan adds its stages to the total once it is made."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __call__(self) -> str:
        self.done += 1
        return f"[{self.done}/{self.total}]"


@dataclass(frozen=True)
class _SavedExtra:
    """A pass's extra, written apart from the checkpoint and taken off the model (save_extra, unload_extra)."""

    extra: Extra
    scratch: Path  # where save_extra wrote it; moved into the output once the checkpoint is written
    load: LoadExtra
    logits: torch.Tensor  # the model's, before unload_extra: what the reload with the extra must give back


def _write_staging(model, tokenizer, ran: list[PassSpec], staging: Path, work_root: Path, manifest: dict,
                   loaded: LoadedRecipe, evaluator: Evaluator) -> list[_SavedExtra]:
    """The checkpoint, and beside it what the passes keep apart (save_extra), into `staging`; returns those
    extras in the order of the passes, with the logits each reload check compares to."""
    saved = []
    for spec in reversed(ran):  # what the last pass added comes off first
        hooks = spec.hooks
        if hooks.save_extra is None:
            continue
        scratch = work_root / f"{EXTRA_PREFIX}{spec.name}.partial"
        work_root.mkdir(parents=True, exist_ok=True)
        extra = hooks.save_extra(model, scratch)
        if extra is None:
            continue
        if extra.name in manifest or any(s.extra.name == extra.name for s in saved):
            raise LlmshrinkError(f"{spec.name}: save_extra: {extra.name!r} is taken in the output's manifest")
        saved.append(_SavedExtra(extra, scratch, hooks.load_extra, evaluator.outputs(model)))
        hooks.unload_extra(model)
    saved.reverse()
    for item in saved:
        manifest[item.extra.name] = item.extra.manifest
    card = model_card(manifest, loaded.text, architecture=type(model).__name__)
    write_checkpoint(model, tokenizer, staging, recipe_text=loaded.text, manifest=manifest, model_card=card)
    for item in saved:
        item.scratch.rename(staging / item.extra.name)
        make_readable(staging / item.extra.name)  # safetensors writes 0600
    return saved


def _verify(model, extras: list[_SavedExtra], staging: Path, manifest: dict, evaluator: Evaluator,
            device: torch.device, out_dir: Path) -> None:
    """Reload what was written: every weight bit for bit, and the outputs equal up to the last bit's rounding;
    then with each pass's extra put back (load_extra) the outputs before it was taken off, within its tolerance.

    (Outputs, not bits: a weight mapped from the file can sit at another memory alignment than in the model that
    was saved, and a BLAS kernel may then round the last bit of a product differently, ~1e-9 on a classifier.)"""
    start = time.perf_counter()
    reloaded = load_checkpoint(staging, device=device)
    manifest["metrics"]["compressed"]["load_seconds"] = time.perf_counter() - start
    changed = _changed_weights(model, reloaded)
    if changed:
        raise LlmshrinkError(f"{out_dir}: reloaded weights differ from the compressed model's: {', '.join(changed[:3])}")
    before = evaluator.outputs(model)
    diff = float((before - evaluator.outputs(reloaded)).abs().max())
    manifest["checks"] = {"reload_max_abs_logit_diff": diff}
    if diff > RELOAD_RTOL * max(1.0, float(before.abs().max())):
        raise LlmshrinkError(f"{out_dir}: reloaded model differs from the compressed one: {manifest['checks']}")
    for item in extras:
        name = item.extra.name
        reloaded = item.load(reloaded, staging / name)
        diff = float((evaluator.outputs(reloaded) - item.logits).abs().max())
        manifest["checks"][f"{name}_reload_max_abs_logit_diff"] = diff
        if diff > item.extra.atol:
            raise LlmshrinkError(f"{out_dir}: the reloaded {name} changes the logits by {diff:.3g}")


def _finish_staging(staging: Path, manifest: dict, loaded: LoadedRecipe, architecture: str, notes: list[str],
                    evaluator: Evaluator) -> None:
    """Card, manifest, training curves and report, with the numbers measured on the written checkpoint."""
    metrics, records = manifest["metrics"], manifest["passes"]
    atomic_write_text(staging / "README.md", model_card(manifest, loaded.text, architecture=architecture))
    _rewrite_manifest(staging, manifest)
    curves = "training_curves.png" if save_training_curves(records, staging / "training_curves.png") else None
    write_report_md(staging / "report.md", loaded.recipe.name, metrics["base"], metrics["compressed"],
                    manifest["stages"], evaluator.protocol, notes, curves_png=curves,
                    protocols=evaluator.protocols)


def _clear_leftovers(work_root: Path, out_dir: Path) -> None:
    """Remove what a failed or killed run left in the work folder, except what a rerun resumes from.

    An output moved aside by a swap that was killed halfway is put back first.
    """
    if not work_root.is_dir():
        return
    previous = work_root / PREVIOUS_DIR
    if previous.is_dir() and not out_dir.exists():
        previous.rename(out_dir)
    for entry in work_root.iterdir():
        if entry.name.startswith(STAGE_PREFIX) or entry.name == SAMPLES_DIR:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if not any(work_root.iterdir()):
        work_root.rmdir()


def _check_output_dir(recipe: Recipe, out_dir: Path, recipe_path: Path) -> None:
    # Fail before the work, not after it; and never replace a directory holding an input.
    from llmshrink.checkpoint import check_output_dir

    check_output_dir(out_dir, recipe.output.overwrite)
    out = out_dir.resolve()
    inputs = [recipe_path.resolve(), Path(recipe.model.id).expanduser().resolve()]
    for path in inputs:
        if path.exists() and (path == out or out in path.parents):
            raise LlmshrinkError(f"output.dir: {out_dir} holds an input ({path}); choose another dir")


def work_dir_for(out_dir: Path) -> Path:
    """Where a run writes before it publishes `out_dir` (and stages keep resumable state): a hidden sibling on
    the same filesystem, so that the output appears by one rename."""
    return out_dir.parent / f".{out_dir.name}.work"


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set by accelerate launch / torchrun


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LlmshrinkError("device: 'cuda' requested but no CUDA device is available; use auto or cpu")
    if name == "cuda":  # one GPU per process under accelerate launch
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


# How far the reloaded model's outputs may differ, relative to their largest magnitude: rounding only.
RELOAD_RTOL = 1e-6


def _changed_weights(model, reloaded) -> list[str]:
    """Names of the tensors whose saved-and-reloaded value is not bit for bit the model's (or that one lacks)."""
    ours, theirs = model.state_dict(), reloaded.state_dict()
    missing = sorted(set(ours) ^ set(theirs))
    return missing or [name for name, t in ours.items()
                       if t.dtype != theirs[name].dtype or t.shape != theirs[name].shape
                       or not torch.equal(t.cpu(), theirs[name].cpu())]


def model_spec_of(recipe) -> ModelSpec:
    """The recipe's model; a classifier's label count, when the recipe leaves it out, from its task's data."""
    spec = recipe.model
    if spec.task == "sequence_classification" and spec.num_labels is None:
        from llmshrink.task_data import num_labels

        spec = spec.model_copy(update={"num_labels": num_labels(recipe.task, "train")})
    return spec


def _rewrite_manifest(out_dir: Path, manifest: dict) -> None:
    path = out_dir / "llmshrink.json"
    saved = json.loads(path.read_text())  # keeps the versions save_checkpoint added
    saved.update(manifest)
    atomic_write_text(path, json.dumps(saved, indent=2) + "\n")
