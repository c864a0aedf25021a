"""The recipe's `evaluate:` section run on one model at a time: params, size, perplexity, latency, MACs,
tasks and peak RAM, with the protocol of each measurement recorded beside it (see eval/report.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmshrink.errors import LlmshrinkError
from llmshrink.eval.specs import LatencySpec

if TYPE_CHECKING:
    from llmshrink.recipe import Recipe


class Evaluator:
    """The recipe's `evaluate:` section, with its token ids loaded once."""

    def __init__(self, recipe: Recipe, tokenizer, device: torch.device):
        from llmshrink.distill.data import token_ids

        self.spec, self.tokenizer, self.device = recipe.evaluate, tokenizer, device
        self.vocab_size = len(tokenizer)
        # An encoder (model.task other than causal_lm) is scored on its task: (eval/encoder_eval.py); the
        # language-model measurements' defaults (perplexity) are off for it (recipe.check_task refuses them set).
        self.encoder = None
        if recipe.model.task != "causal_lm":
            from llmshrink.eval.encoder_eval import EncoderTask

            if recipe.task is None:
                raise LlmshrinkError(f"task: model.task {recipe.model.task}: an encoder needs a task: section to be scored on")
            self.encoder = EncoderTask(recipe.task, tokenizer, device)
        self.specs = self.spec.perplexity_specs if self.encoder is None else []  # the primary dataset first
        self.has_perplexity = bool(self.specs)
        # By name, loaded once; several datasets add perplexity_by_dataset and the protocol of each.
        self.dataset_ids = {spec.label: token_ids(spec.data, tokenizer) for spec in self.specs}
        self.named = len(self.specs) > 1
        self.ids = self.dataset_ids[self.specs[0].label] if self.specs else None
        self._perplexity: dict = {}  # the primary protocol's shared fields (data, window, ...), see `protocol`
        self._datasets: dict[str, dict] = {}  # every dataset's protocol, by name
        self.tied: dict[str, bool] = {}  # per measured model ("base", "compressed"): embeddings tied?
        self.protocols: dict = {}  # the other measurements: macs, memory, lm_eval, generation; task, latency
        if self.encoder is not None:
            self.protocols["task"] = self.encoder.protocol
        self._scored: tuple | None = None  # (model, its task scores): an encoder's last quality(), see measure

    @property
    def quality_name(self) -> str:
        """The metric quality() gives: "perplexity" (lower is better), "accuracy" or "spearman" (higher)."""
        return self.encoder.primary if self.encoder is not None else "perplexity"

    @property
    def has_quality(self) -> bool:
        """Whether quality() measures anything: an encoder's task always, a decoder's perplexity unless off."""
        return self.encoder is not None or self.has_perplexity

    def quality(self, model) -> float:
        """The one number of a stage row (and ctx.evaluate): perplexity of a decoder, the task's primary metric
        (accuracy, spearman) of an encoder, whose other scores measure(known=) may reuse."""
        if self.encoder is not None:
            scores = self.encoder.scores(model)
            self._scored = (model, scores)
            return scores[self.encoder.primary]
        return self.perplexity(model)

    @property
    def protocol(self) -> dict:
        """The perplexity protocol: fields shared by every measurement, and per measured model what
        differs between them (tied embeddings: an `untie` stage unties the compressed model only)."""
        if not self._perplexity:
            return {}
        protocol = {**self._perplexity, "tied_embeddings": dict(self.tied)}
        if self.named:
            protocol["datasets"] = {spec.label: self._datasets[spec.label] for spec in self.specs
                                    if spec.label in self._datasets}
        return protocol

    def params(self, model) -> int:
        from llmshrink.eval.size import count_params

        return count_params(model)

    def perplexity(self, model) -> float:
        """The primary dataset's perplexity (stage rows, ctx.evaluate during training)."""
        ppl, self._perplexity = self._dataset_perplexity(model, self.specs[0])
        return ppl

    def _dataset_perplexity(self, model, spec) -> tuple[float, dict]:
        from llmshrink.eval.perplexity import perplexity

        bos = self.tokenizer.bos_token_id if spec.add_bos else None
        result = perplexity(model, self.dataset_ids[spec.label], spec.window, spec.stride, spec.batch_size,
                            self.device, bos_token_id=bos)
        protocol = {
            "dataset": spec.data.source, "config": spec.data.config, "split": spec.data.split,
            "max_tokens": spec.data.max_tokens, **result.protocol, "tokens_scored": result.tokens_scored,
        }
        self._datasets[spec.label] = {**protocol, "domain": spec.domain}
        return result.ppl, protocol

    def measure(self, model, which: str, log, known: float | None = None) -> dict:
        """The metrics of `model`, recorded as `which` ("base" or "compressed") in the protocol.

        `known`: the quality() of `model` as it is now (the last stage row's), reused instead of measured again:
        a decoder's perplexity; an encoder's task scores of that quality() call, when it was the last one and
        scored this very model to that value (else the scores are measured)."""
        from llmshrink.eval.latency import measure_latency
        from llmshrink.eval.size import has_tied_embeddings, safetensors_bytes

        metrics = {"params": self.params(model), "size_bytes": safetensors_bytes(model)}
        if self.encoder is not None:
            return {**metrics, **self._measure_encoder(model, log, known)}
        if self.has_perplexity:
            self.tied[which] = has_tied_embeddings(model)
            metrics["perplexity"] = known if known is not None else self.perplexity(model)
            if self.named:
                by_name = {self.specs[0].label: metrics["perplexity"]}
                by_name.update({spec.label: self._dataset_perplexity(model, spec)[0] for spec in self.specs[1:]})
                metrics["perplexity_by_dataset"] = by_name
                for name, value in by_name.items():
                    log(f"  perplexity ({name}): {value:.2f}")
            else:
                log(f"  perplexity: {metrics['perplexity']:.2f}")
        if self.spec.latency is not None:
            lat = self.spec.latency
            timing = measure_latency(model, self.vocab_size, lat.prompt_tokens, lat.new_tokens, lat.batch_size,
                                     lat.repeats)
            metrics["decode_tokens_per_s"] = timing["tokens_per_s"]  # prefill excluded
            metrics["decode_ms_per_token"] = timing["decode_ms_per_token"]
            metrics["prefill_ms"] = timing["prefill_ms"]
        if self.spec.macs:
            metrics.update(self.macs(model, log))
        return metrics

    def _measure_encoder(self, model, log, known: float | None) -> dict:
        """Task scores (those of the last quality() where `known` is its value on this model), latency per batch
        and MACs per token of an encoder."""
        scored, scores = self._scored or (None, None)
        if known is not None and scored is model and scores[self.encoder.primary] == known:
            metrics = dict(scores)
        else:
            metrics = self.encoder.scores(model)
        log("  " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.spec.latency is not None:
            timing, self.protocols["latency"] = self.encoder.latency(model, self.spec.latency)
            metrics.update(timing)
        if self.spec.macs:
            seq_len = self.encoder.batch(1)["input_ids"].shape[1]
            macs, missing = self.encoder.macs(model, seq_len)
            metrics.update(macs)
            self.protocols["macs"] = {"seq_len": seq_len, "decode_context": None, "counter": "FlopCounterMode / 2",
                                      "how": "one forward over seq_len random tokens (the first example's length)"}
            if missing:
                log(f"  MACs: not counted (no formula): {', '.join(missing)}")
        return metrics

    def macs(self, model, log) -> dict:
        from llmshrink.eval.macs import macs_per_decode_token, macs_per_token
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
        """lm-eval and generation metrics, as {"lm_eval": {task: {metric}}, "generation": {metric}}; {} for an
        encoder (its task scores are measure()'s)."""
        out: dict = {}
        if self.encoder is not None:
            return out
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
        """Peak RAM of loading `model_or_dir` (a checkpoint dir, a model id, or a ModelSpec: an encoder's base
        must be one, so that its Auto class is the task's), then of generating (decoder) or of one forward
        over the latency batch (encoder), in a fresh process."""
        from llmshrink.eval.memory import measure_memory

        lat = self.spec.latency or LatencySpec()
        if self.encoder is not None:
            from llmshrink.eval.encoder_eval import latency_batch_size

            size = latency_batch_size(lat)
            tokens = int(self.encoder.batch(size)["input_ids"].shape[1])
            measured = measure_memory(model_or_dir, tokens, 1, size, str(device), forward_only=True)
            self.protocols["memory"] = {"tokens": tokens, "batch_size": size, "device": str(device),
                                        "how": "peak RSS of a fresh process that loads, then runs one forward "
                                               "over batch_size random sequences of `tokens` tokens"}
            return {"peak_ram_load_mb": measured["peak_rss_load_mb"],
                    "peak_ram_forward_mb": measured["peak_rss_forward_mb"]}
        measured = measure_memory(model_or_dir, lat.prompt_tokens, lat.new_tokens, lat.batch_size, str(device))
        self.protocols["memory"] = {"prompt_tokens": lat.prompt_tokens, "new_tokens": lat.new_tokens,
                                    "batch_size": lat.batch_size, "device": str(device),
                                    "how": "peak RSS of a fresh process that loads, then generates greedily"}
        return {"peak_ram_load_mb": measured["peak_rss_load_mb"],
                "peak_ram_generate_mb": measured["peak_rss_generate_mb"]}

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword inputs of the reload check's forward: {"input_ids"} of a decoder, its first 64 evaluation
        tokens (1, 64); an encoder's first task texts, padded, with their attention mask (and token_type_ids
        where the tokenizer gives them)."""
        if self.encoder is not None:
            return self.encoder.probe_inputs()
        ids = self.ids[:64] if self.ids is not None else torch.arange(16) % self.vocab_size
        return {"input_ids": ids.unsqueeze(0).to(self.device)}

    def outputs(self, model) -> torch.Tensor:
        """What the reload check compares: the model's logits on probe_inputs(), else (a bare encoder) its
        last_hidden_state; in eval mode, without gradients."""
        from llmshrink.eval.encoder_eval import model_outputs

        return model_outputs(model, self.probe_inputs())
