"""Run EleutherAI's lm-evaluation-harness in memory on a loaded (compressed) model.

The model object goes straight into lm-eval's `HFLM`, so what is scored is exactly the model in
memory; `lm_eval --model hf --model_args pretrained=CHECKPOINT,trust_remote_code=True` on the saved
checkpoint gives the same numbers (tests/test_lm_eval_bridge.py checks it). Tasks are lm-eval's
registry tasks (their data comes from the Hugging Face hub) or the offline task YAMLs in the
package's `llmshrink/evals/` directory.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llmshrink.errors import LlmshrinkError, did_you_mean
from llmshrink.eval import EVALS_DIR
from llmshrink.eval.specs import LmEvalSpec  # noqa: F401  (re-exported: its home is eval.specs)

ALL_LOCAL_TAG = "llmshrink_offline"  # the tag every task in evals/ carries: runs them all


def evals_dir() -> Path:
    """The package's evals/ directory (package data: installed with llmshrink)."""
    path = EVALS_DIR
    if not path.is_dir():
        raise LlmshrinkError(
            f"lm_eval.include_path: no evals/ directory at {path} (llmshrink installed without its package "
            "data?); reinstall llmshrink, or give include_path, a directory of lm-eval task YAMLs"
        )
    return path


def local_tasks(include_path: str | Path | None = None) -> list[str]:
    """Task, group and tag names defined by the YAMLs under include_path (default: evals/)."""
    return list(_task_manager(str(_local_dir(include_path)), include_defaults=False).all_tasks)


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | str,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    device: str | None = None,
    num_fewshot: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score `model` on lm-eval tasks; returns {"results": {task: {metric: value}}, "protocol": {...}}.

    Metric names drop lm-eval's ",FILTER" suffix when the task reports that metric under one filter
    only (`acc,none` -> `acc`), and keep it as `metric,filter` when there are several. Standard errors
    are kept as `METRIC_stderr` where lm-eval computed one. `protocol` holds what a rerun needs:
    lm-eval's version, each task's version, source YAML, data hash and sample count, the settings,
    and the equivalent `lm_eval` command line for the saved checkpoint.

    device: None scores the model where it is; a name moves the model there first. The tokenizer is
    copied (lm-eval sets a pad token on the one it gets) and global RNG states are restored after.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise LlmshrinkError(f"lm_eval: the model is a {type(model).__name__}; lm-eval needs a transformers model")
    names = _task_names(tasks)
    if limit is not None and limit <= 0:
        raise LlmshrinkError(f"lm_eval.limit: {limit} is not allowed; give a number > 0 (below 1: a fraction)")
    if batch_size < 1:
        raise LlmshrinkError(f"lm_eval.batch_size: {batch_size} is not allowed; give an integer >= 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise LlmshrinkError(f"lm_eval.num_fewshot: {num_fewshot} is not allowed; give an integer >= 0")
    local = _local_dir(include_path)
    manager = _manager_for(names, local)
    if device is not None:
        model.to(device)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    with _quiet_lm_eval(), _rng_preserved():
        try:
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=batch_size)
            raw = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False)
        except ConnectionError as err:  # datasets raises it when the hub is unreachable or offline
            raise LlmshrinkError(
                f"lm_eval.tasks: {err}; registry tasks download their data from the Hugging Face hub, which is "
                f"unreachable here; the local tasks in {local} run offline"
            ) from err
        finally:
            model.train(was_training)
    results = {task: _compact(row) for task, row in raw["results"].items()}
    protocol = _protocol(raw, names, local, model, limit, batch_size, num_fewshot)
    for task, metrics in results.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not k.endswith("_stderr"))
        log(f"  lm-eval {task}: {shown} ({protocol['tasks'].get(task, {}).get('samples', '?')} docs)")
    return {"results": results, "protocol": protocol}


# --- tasks --------------------------------------------------------------------------------------


def _task_names(tasks: Sequence[str] | str) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    if not names or not all(names):
        raise LlmshrinkError(f"lm_eval.tasks: {tasks!r} is not allowed; give one or more task names")
    return names


def _local_dir(include_path: str | Path | None) -> Path:
    if include_path is None:
        return evals_dir()
    path = Path(include_path)
    if not path.is_dir():
        raise LlmshrinkError(f"lm_eval.include_path: {path} is not a directory; give a directory of task YAMLs")
    return path.resolve()


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str, include_defaults: bool) -> Any:
    """lm-eval's task index; with the registry (include_defaults) it scans ~15k YAMLs (~20 s), once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _is_yaml_file(name: str) -> bool:
    return Path(name).suffix in (".yaml", ".yml") and Path(name).is_file()


def _manager_for(names: list[str], local: Path) -> Any:
    """The local-only index when every task is local (fast), else the one with the registry too."""
    manager = _task_manager(str(local), include_defaults=False)
    if all(name in manager.all_tasks or _is_yaml_file(name) for name in names):
        return manager
    for name in names:
        if Path(name).suffix in (".yaml", ".yml") and not Path(name).is_file():
            raise LlmshrinkError(f"lm_eval.tasks: no such task file: {name}")
    ours = manager.all_tasks
    manager = _task_manager(str(local), include_defaults=True)
    unknown = [name for name in names if name not in manager.all_tasks and not _is_yaml_file(name)]
    if unknown:
        # A close local name is the likelier meaning than one of the registry's ~15k names.
        hint = did_you_mean(unknown[0], ours) or did_you_mean(unknown[0], manager.all_tasks)
        raise LlmshrinkError(
            f"lm_eval.tasks: unknown task {unknown[0]!r}{hint}; local tasks "
            f"in {local}: {', '.join(ours) or 'none'}; lm-eval registry tasks (`lm_eval ls tasks`) also work "
            "but download their data from the Hugging Face hub"
        )
    return manager


# --- results ------------------------------------------------------------------------------------


def _compact(row: dict[str, Any]) -> dict[str, float]:
    """{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": 0.5, "acc_stderr": 0.1}."""
    keys = [key for key in row if "," in key and _is_number(row[key])]
    filters = Counter(key.split(",", 1)[0] for key in keys)
    out = {}
    for key in keys:
        metric, filter_name = key.split(",", 1)
        out[metric if filters[metric] == 1 else f"{metric},{filter_name}"] = float(row[key])
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _protocol(raw: dict, names: list[str], local: Path, model, limit, batch_size, num_fewshot) -> dict:
    tasks = {}
    for task, config in raw.get("configs", {}).items():
        source = Path(str((config.get("metadata") or {}).get("config_source") or "?")).resolve()
        entry: dict[str, Any] = {
            "version": raw.get("versions", {}).get(task),
            "num_fewshot": raw.get("n-shot", {}).get(task),
            "samples": raw.get("n-samples", {}).get(task, {}).get("effective"),
            "of": raw.get("n-samples", {}).get(task, {}).get("original"),
            "source": _describe_source(source, local),
        }
        data = (config.get("dataset_kwargs") or {}).get("llmshrink_data")
        if data and (source.parent / data).is_file():
            entry["data_sha256"] = hashlib.sha256((source.parent / data).read_bytes()).hexdigest()
        tasks[task] = entry
    weight = next(model.parameters())
    command = (
        "lm_eval --model hf --model_args pretrained=CHECKPOINT,trust_remote_code=True,"
        f"dtype={str(weight.dtype).removeprefix('torch.')} --tasks {','.join(names)} --include_path {local} "
        f"--device {weight.device} --batch_size {batch_size}"
        + (f" --limit {limit:g}" if limit is not None else "")
        + (f" --num_fewshot {num_fewshot}" if num_fewshot is not None else "")
    )
    return {
        "lm_eval_version": raw.get("lm_eval_version"),
        "tasks_requested": names,
        "include_path": str(local),
        "limit": limit,
        "batch_size": batch_size,
        "num_fewshot": num_fewshot,
        "tasks": tasks,
        "command": command,
    }


def _describe_source(source: Path, local: Path) -> str:
    """evals/NAME.yaml for a local task, lm_eval/tasks/... for a registry one, else the path."""
    import lm_eval

    for root, label in ((local, local.name), (Path(lm_eval.__file__).resolve().parent, "lm_eval")):
        if source.is_relative_to(root):
            return f"{label}/{source.relative_to(root).as_posix()}"
    return str(source)


# --- side effects -------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval warns on every in-memory run (model object passed, custom dataset kwargs): not news."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """simple_evaluate reseeds random, numpy and torch; a caller mid-run keeps its own streams."""
    import numpy as np

    state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
