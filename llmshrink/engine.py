"""Run a recipe: load -> passes in order -> evaluate base and result -> save -> verify reload."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from llmshrink import __version__
from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.fileio import atomic_write_text, make_readable
from llmshrink.passes.lora import load_adapter, lora_settings, merge_lora, save_adapter, unload_lora
from llmshrink.recipe import LatencySpec, LoadedRecipe, Recipe
from llmshrink.registry import get_pass

ADAPTER_DIR = "adapter"  # unmerged LoRA adapters, in peft's format, inside the output folder


def run_recipe(loaded: LoadedRecipe, output_dir: str | None = None, log=print) -> dict:
    """Apply `loaded` end to end; returns the manifest written to <output>/llmshrink.json.

    Under `accelerate launch` every process runs the stages (training is data-parallel, the other
    passes are deterministic, so all processes hold the same model); only the main process then
    evaluates and saves, and the others return an empty manifest.
    """
    from llmshrink.checkpoint import load_checkpoint, save_checkpoint
    from llmshrink.distill.curves import save_training_curves
    from llmshrink.eval.efficiency import dir_size
    from llmshrink.eval.report import format_table, write_report_md
    from llmshrink.hub import model_card
    from llmshrink.models import load_base_model

    recipe = loaded.recipe
    out_dir = Path(output_dir or recipe.output.dir)
    _check_output_dir(recipe, out_dir, loaded.path)
    torch.manual_seed(recipe.seed)
    device = _resolve_device(recipe.device)
    steps = 5 + len(loaded.stages)
    step = iter(range(1, steps + 1))

    log(f"[{next(step)}/{steps}] load {recipe.model.id}")
    base_loaded = load_base_model(recipe.model, device=device, log=log)  # may download/convert once (cached)
    model, tokenizer = base_loaded.model, base_loaded.tokenizer
    evaluator = Evaluator(recipe, tokenizer, device)

    # A second, timed load gives a fair load time (the first may have converted a GGUF) and the teacher:
    # an untouched copy of the base, evaluated after the stages so that a bad stage fails fast.
    start = time.perf_counter()
    teacher = load_base_model(recipe.model, device=device, log=log).model
    load_seconds = time.perf_counter() - start
    teacher.requires_grad_(False).eval()
    ctx = Context(tokenizer=tokenizer, device=device, teacher=teacher, data=recipe.data, seed=recipe.seed, log=log)
    if recipe.evaluate.after_each_stage and evaluator.has_perplexity:
        ctx.evaluate = evaluator.perplexity  # passes with inner steps (iterate) report after each

    stage_rows, records = [], []
    work_root = work_dir_for(out_dir)  # resumable state; removed once the checkpoint is saved
    for index, stage in enumerate(loaded.stages):
        log(f"[{next(step)}/{steps}] {stage.name}")
        ctx.work_dir = work_root / f"stage-{index}-{stage.name}"
        start = time.perf_counter()
        record = get_pass(stage.name).apply(model, stage.config, ctx)
        seconds = time.perf_counter() - start
        row = {"stage": f"{index}:{stage.name}", "seconds": round(seconds, 2), "params": evaluator.params(model)}
        if recipe.evaluate.after_each_stage and evaluator.has_perplexity:
            row["perplexity"] = evaluator.perplexity(model)
            log(f"  perplexity after {stage.name}: {row['perplexity']:.2f}")
        stage_rows.append(row)
        records.append(
            {"pass": stage.name, "config": stage.config.model_dump(mode="json"), "record": record,
             "seconds": round(seconds, 3)}
        )

    lora = lora_settings(model)
    if lora and lora["merge"]:  # after every stage, so that a later distill trained the adapters first
        log(f"  lora: merged {merge_lora(model)} adapters into the weights")
        lora = None

    if not _is_main_process():
        log(f"process {os.environ.get('RANK')}: stages done; the main process evaluates and saves")
        return {}

    log(f"[{next(step)}/{steps}] evaluate base model")
    base = evaluator.measure(teacher, log)
    base["load_seconds"] = load_seconds
    base.update(evaluator.tasks(teacher, "base", log))

    log(f"[{next(step)}/{steps}] evaluate compressed model")
    compressed = evaluator.measure(model, log, known_ppl=stage_rows[-1].get("perplexity") if stage_rows else None)
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

    log(f"[{next(step)}/{steps}] save {out_dir}")
    architecture = type(model).__name__
    card = model_card(manifest, loaded.text, architecture=architecture)
    adapted, adapter = None, None
    if lora:  # unmerged adapters go beside the model in peft's format (PeftModel.from_pretrained loads them)
        adapted = _logits(model, evaluator.probe_ids())
        adapter = save_adapter(model, out_dir.parent / f".{out_dir.name}.adapter-tmp")
        unload_lora(model)
        manifest["adapter"] = {"dir": ADAPTER_DIR, "merged": False}
    save_checkpoint(model, tokenizer, out_dir, recipe_text=loaded.text, manifest=manifest, model_card=card,
                    overwrite=recipe.output.overwrite)
    if adapter is not None:
        adapter.rename(out_dir / ADAPTER_DIR)
        make_readable(out_dir / ADAPTER_DIR)  # safetensors writes 0600
    shutil.rmtree(work_root, ignore_errors=True)

    log(f"[{next(step)}/{steps}] verify reload")
    start = time.perf_counter()
    reloaded = load_checkpoint(out_dir, device=device)
    compressed["load_seconds"] = time.perf_counter() - start
    manifest["checks"] = {"reload_max_abs_logit_diff": _max_logit_diff(model, reloaded, evaluator.probe_ids())}
    if manifest["checks"]["reload_max_abs_logit_diff"] != 0.0:
        raise LlmshrinkError(f"{out_dir}: reloaded model differs from the compressed one: {manifest['checks']}")
    if adapted is not None:  # peft's reload sums the adapter in a different order: equal to float tolerance
        with_adapter = load_adapter(reloaded, out_dir / ADAPTER_DIR)
        diff = float((_logits(with_adapter, evaluator.probe_ids()) - adapted).abs().max())
        manifest["checks"]["adapter_reload_max_abs_logit_diff"] = diff
        if diff > 1e-4:
            raise LlmshrinkError(f"{out_dir}: the reloaded adapter changes the logits by {diff:.3g}")
    compressed["size_bytes"] = dir_size(out_dir, weights_only=True)
    if recipe.evaluate.memory:
        log("  peak RAM: loading and generating, each model in a fresh process")
        base.update(evaluator.memory(recipe.model.id, device))
        compressed.update(evaluator.memory(out_dir, device))
        manifest["evaluation"]["memory"] = evaluator.protocols["memory"]

    card = model_card(manifest, loaded.text, architecture=architecture)
    atomic_write_text(out_dir / "README.md", card)
    _rewrite_manifest(out_dir, manifest)
    curves = "training_curves.png" if save_training_curves(records, out_dir / "training_curves.png") else None
    write_report_md(out_dir / "report.md", recipe.name, base, compressed, stage_rows, evaluator.protocol,
                    base_loaded.notes, curves_png=curves)
    log("")
    log(format_table(base, compressed))
    log(f"\nsaved {out_dir} (report: {out_dir / 'report.md'})")
    return manifest


class Evaluator:
    """The recipe's `evaluate:` section, with its token ids loaded once."""

    def __init__(self, recipe: Recipe, tokenizer, device: torch.device):
        from llmshrink.distill.data import token_ids

        self.spec, self.tokenizer, self.device = recipe.evaluate, tokenizer, device
        self.vocab_size = len(tokenizer)
        ppl = self.spec.perplexity
        self.has_perplexity = ppl is not None
        self.ids = token_ids(ppl.data, tokenizer) if ppl is not None else None
        self.protocol: dict = {}  # perplexity
        self.protocols: dict = {}  # the other measurements: macs, memory, lm_eval, generation

    def params(self, model) -> int:
        from llmshrink.eval.efficiency import count_params

        return count_params(model)

    def perplexity(self, model) -> float:
        from llmshrink.eval.efficiency import has_tied_embeddings
        from llmshrink.eval.perplexity import perplexity

        spec = self.spec.perplexity
        bos = self.tokenizer.bos_token_id if spec.add_bos else None
        result = perplexity(model, self.ids, spec.window, spec.stride, spec.batch_size, self.device,
                            bos_token_id=bos)
        self.protocol = {
            "dataset": spec.data.source, "config": spec.data.config, "split": spec.data.split,
            "max_tokens": spec.data.max_tokens, **result.protocol, "tokens_scored": result.tokens_scored,
            "tied_embeddings": has_tied_embeddings(model),
        }
        return result.ppl

    def measure(self, model, log, known_ppl: float | None = None) -> dict:
        from llmshrink.eval.efficiency import measure_latency, safetensors_bytes

        metrics = {"params": self.params(model), "size_bytes": safetensors_bytes(model)}
        if self.has_perplexity:
            metrics["perplexity"] = known_ppl if known_ppl is not None else self.perplexity(model)
            log(f"  perplexity: {metrics['perplexity']:.2f}")
        if self.spec.latency is not None:
            lat = self.spec.latency
            timing = measure_latency(model, self.vocab_size, lat.prompt_tokens, lat.new_tokens, lat.batch_size,
                                     lat.repeats)
            metrics["decode_tokens_per_s"] = timing["tokens_per_s"]
            metrics["decode_ms_per_token"] = timing["decode_ms_per_token"]
            metrics["prefill_ms"] = timing["prefill_ms"]
        if self.spec.macs:
            metrics.update(self.macs(model, log))
        return metrics

    def macs(self, model, log) -> dict:
        from llmshrink.eval.efficiency import macs_per_decode_token, macs_per_token
        from llmshrink.eval.perplexity import max_positions

        # Attention MACs grow with the context: count at the latency prompt length, and say so.
        length = self.spec.latency.prompt_tokens if self.spec.latency is not None else 128
        limit = max_positions(model)
        length = min(length, limit - 1) if limit else length
        prefill = macs_per_token(model, seq_len=length)
        decode = macs_per_decode_token(model, context=length)
        self.protocols["macs"] = {"seq_len": length, "decode_context": length, "counter": "FlopCounterMode / 2"}
        missing = prefill["uncounted_modules"] + prefill["uncounted_ops"]
        if missing:
            log(f"  MACs: not counted (no formula): {', '.join(map(str, missing))}")
        return {"macs_per_token": prefill["total"], "decode_macs_per_token": decode["total"]}

    def tasks(self, model, which: str, log) -> dict:
        """lm-eval and generation metrics, as {"lm_eval": {task: {metric}}, "generation": {metric}}."""
        out: dict = {}
        if self.spec.lm_eval is not None:
            from llmshrink.eval.lm_eval_bridge import run_lm_eval

            result = run_lm_eval(model, self.tokenizer, **self.spec.lm_eval.model_dump(), log=log)
            out["lm_eval"] = result["results"]
            self.protocols["lm_eval"] = result["protocol"]
        if self.spec.generation is not None:
            from llmshrink.eval.generation import evaluate_generation
            from llmshrink.eval.report import GENERATION_METRICS

            result = evaluate_generation(model, self.tokenizer, self.spec.generation, self.device)
            scores = {k: v for k, v in result.items() if k in GENERATION_METRICS}
            log("  generation: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            out["generation"] = scores
            protocol = self.protocols.setdefault("generation", {
                **self.spec.generation.model_dump(), "data_file": result["data"], "samples": result["samples"],
            })
            protocol[f"{which}_examples"] = result["examples"]
            protocol[f"{which}_prompts_truncated"] = result["prompts_truncated"]
        return out

    def memory(self, model_or_dir, device: torch.device) -> dict:
        from llmshrink.eval.efficiency import measure_memory

        lat = self.spec.latency or LatencySpec()
        measured = measure_memory(model_or_dir, lat.prompt_tokens, lat.new_tokens, lat.batch_size, str(device))
        self.protocols["memory"] = {"prompt_tokens": lat.prompt_tokens, "new_tokens": lat.new_tokens,
                                    "batch_size": lat.batch_size, "device": str(device),
                                    "how": "peak RSS of a fresh process that loads, then generates greedily"}
        return {"peak_ram_load_mb": measured["peak_rss_load_mb"],
                "peak_ram_generate_mb": measured["peak_rss_generate_mb"]}

    def probe_ids(self) -> torch.Tensor:
        ids = self.ids[:64] if self.ids is not None else torch.arange(16) % self.vocab_size
        return ids.unsqueeze(0).to(self.device)


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
    """Where stages keep resumable state for `out_dir`: a hidden sibling, so the output stays clean."""
    return out_dir.parent / f".{out_dir.name}.work"


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set by accelerate launch / torchrun


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LlmshrinkError("device: 'cuda' requested but no CUDA device is available; use auto or cpu")
    if name == "cuda":  # one GPU per process under accelerate launch
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


@torch.no_grad()
@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _max_logit_diff(a, b, ids: torch.Tensor) -> float:
    return float((_logits(a, ids) - _logits(b, ids)).abs().max())


def _rewrite_manifest(out_dir: Path, manifest: dict) -> None:
    import json

    path = out_dir / "llmshrink.json"
    saved = json.loads(path.read_text())  # keeps the versions save_checkpoint added
    saved.update(manifest)
    atomic_write_text(path, json.dumps(saved, indent=2) + "\n")
