"""data: {source: teacher | mix}: samples drawn from the teacher are deterministic under a seed, cached,
reused, resumed and extended; a mix holds both at its ratio; a recipe using them validates and runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_tokenizer

from llmshrink.cli import main
from llmshrink.context import Context
from llmshrink.distill.teacher_data import teacher_token_ids, training_token_ids
from llmshrink.engine import SAMPLES_DIR, work_dir_for
from llmshrink.errors import LlmshrinkError
from llmshrink.specs import DataSpec, MixDataSpec, TeacherDataSpec, TeacherSampling


@pytest.fixture(scope="module")
def teacher():
    return tiny_gpt2().eval()


def sample(teacher, tokens=300, cache_dir=None, **settings):
    sampling = TeacherSampling(batch_size=4, sample_tokens=24, **settings)
    return teacher_token_ids(sampling, tokens, teacher, tiny_tokenizer(), cache_dir=cache_dir, progress=False)


def test_samples_are_deterministic_under_a_seed_and_the_global_rng_is_left_alone(teacher):
    torch.manual_seed(123)
    first = sample(teacher)
    after_first = torch.rand(1)
    torch.manual_seed(123)
    again = sample(teacher)
    assert torch.equal(first, again) and torch.equal(torch.rand(1), after_first)
    assert first.numel() == 300 and first.dtype == torch.long
    assert not torch.equal(first, sample(teacher, seed=1))
    assert not torch.equal(first, sample(teacher, temperature=0.5))


def test_samples_end_at_eos_and_are_at_most_sample_tokens_long(teacher):
    ids = sample(teacher, tokens=400).tolist()
    eos = tiny_tokenizer().eos_token_id
    lengths, run = [], 0
    for t in ids:
        if t == eos:
            lengths.append(run)
            run = 0
        else:
            run += 1
    assert lengths and max(lengths) <= 24  # no BOS kept: a sample is the new tokens only


def test_the_cache_is_reused_resumed_and_extended(teacher, tmp_path, monkeypatch):
    fresh = sample(teacher, tokens=300, cache_dir=tmp_path)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1
    settings = json.loads((folders[0] / "settings.json").read_text())
    assert settings["sampling"]["batch_size"] == 4 and settings["sampling"]["temperature"] == 1.0
    batches = sorted(folders[0].glob("batch-*.safetensors"))
    assert len(batches) >= 2

    calls = []
    real_generate = type(teacher).generate

    def counting_generate(self, *args, **kwargs):
        calls.append(1)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(type(teacher), "generate", counting_generate)
    assert torch.equal(sample(teacher, tokens=300, cache_dir=tmp_path), fresh) and calls == []  # reused
    batches[-1].unlink()  # as if killed before the last batch was written
    assert torch.equal(sample(teacher, tokens=300, cache_dir=tmp_path), fresh) and calls == [1]  # resumed
    longer = sample(teacher, tokens=900, cache_dir=tmp_path)
    assert torch.equal(longer[:300], fresh) and longer.numel() == 900  # extended: the same samples first
    assert list(tmp_path.iterdir()) == folders
    assert not list(folders[0].glob(".*tmp"))
    sample(teacher, tokens=50, cache_dir=tmp_path, top_p=0.9)
    assert len(list(tmp_path.iterdir())) == 2  # other settings: another key


def test_prompts_start_the_samples(teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the time was\n\nshe said that it\n")
    ids = sample(teacher, tokens=200, prompts=str(prompts), prompt_tokens=2).tolist()
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    starts = [ids[0]] + [ids[i + 1] for i, t in enumerate(ids[:-1]) if t == eos]
    firsts = {tokenizer.convert_tokens_to_ids(w) for w in ("the", "she")}
    assert set(starts[:-1]) <= firsts and len(set(starts[:-1])) == 2


def test_a_mix_holds_corpus_text_then_teacher_samples_at_its_ratio(teacher, tiny_text, tmp_path):
    corpus = DataSpec(source=str(tiny_text))
    mix = MixDataSpec(source="mix", tokens=400, teacher_share=0.25, corpus=corpus,
                      teacher=TeacherSampling(batch_size=4, sample_tokens=24))
    tokenizer = tiny_tokenizer()
    ids = training_token_ids(mix, tokenizer, "train", teacher, cache_dir=tmp_path)
    assert ids.numel() == 400
    from llmshrink.distill.data import token_ids

    assert torch.equal(ids[:300], token_ids(corpus.model_copy(update={"max_tokens": 300}), tokenizer))
    assert torch.equal(ids[300:], sample(teacher, tokens=100, cache_dir=tmp_path))


def test_teacher_data_has_no_heldout_part_and_needs_a_teacher(tiny_text):
    spec = TeacherDataSpec(source="teacher", tokens=10)
    with pytest.raises(LlmshrinkError, match="teacher samples have no held-out part"):
        Context(tokenizer=tiny_tokenizer(), data=spec).heldout_token_ids()
    with pytest.raises(LlmshrinkError, match="sampling needs the teacher model"):
        Context(tokenizer=tiny_tokenizer(), data=spec).train_token_ids()
    mix = MixDataSpec(source="mix", tokens=10, corpus=DataSpec(source=str(tiny_text), heldout=0.2))
    assert Context(tokenizer=tiny_tokenizer(), data=mix).heldout_token_ids().numel() > 0


def recipe(model_dir, out_dir, data: str) -> str:
    return f"""\
name: tiny-teacher
model: {{id: {model_dir}}}
data: {data}
stages:
  - prune_ffn: {{keep: 0.5, calibration_tokens: 64}}
  - distill: {{steps: 3, batch_size: 2, seq_len: 32, warmup_steps: 1, loss: reverse_kl, alpha: 1.0}}
evaluate:
  perplexity: {{data: {{source: builtin:shakespeare, split: test, max_tokens: 200}}, window: 32, stride: 16}}
  latency: null
  macs: false
  memory: false
output: {{dir: {out_dir}}}
"""


def test_a_recipe_with_teacher_data_validates_and_runs_end_to_end(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    path = tmp_path / "teacher.yaml"
    path.write_text(recipe(tiny_model_dir, out, "{source: teacher, tokens: 256, batch_size: 4, sample_tokens: 32}"))
    assert main(["validate", str(path)]) == 0
    assert main(["apply", str(path)]) == 0
    manifest = json.loads((out / "llmshrink.json").read_text())
    distilled = manifest["passes"][1]["record"]
    assert distilled["tokens"] == 3 * 2 * 32 and distilled["loss"] == "reverse_kl"
    assert manifest["checks"]["reload_max_abs_logit_diff"] == 0.0
    assert not work_dir_for(out).exists()  # the samples went with the work folder once the run succeeded


def test_a_failed_run_keeps_the_teacher_samples_for_the_rerun(tmp_path, tiny_model_dir, monkeypatch):
    import llmshrink.engine as engine

    out = tmp_path / "out"
    path = tmp_path / "teacher.yaml"
    path.write_text(recipe(tiny_model_dir, out, "{source: teacher, tokens: 256, batch_size: 4, sample_tokens: 32}"))
    monkeypatch.setattr(engine, "_verify", lambda *a: (_ for _ in ()).throw(LlmshrinkError("simulated")))
    assert main(["apply", str(path)]) == 2
    kept = list((work_dir_for(out) / SAMPLES_DIR).glob("*/batch-*.safetensors"))
    assert kept and not out.exists()


@pytest.mark.parametrize(("data", "message"), [
    ("{source: teacher, tokens: 10, topp: 0.9}", "data.topp: unknown key; allowed: temperature, top_p, prompts, "
     "prompt_tokens, sample_tokens, batch_size, seed, source, tokens"),
    ("{source: teacher}", "data.tokens: required field is missing"),
    ("{source: teacher, tokens: 10, top_p: 2}", "data.top_p: input should be less than or equal to 1, got 2"),
    ("{source: teacher, tokens: 10, prompts: missing.txt}", "data.prompts.source: file not found: missing.txt"),
    ("{source: mix, tokens: 10, teacher_share: 1}", "data.teacher_share: input should be less than 1, got 1"),
    ("{source: mix, tokens: 10, teacher: {x: 1}}", "data.teacher.x: unknown key; allowed: temperature, top_p, "
     "prompts, prompt_tokens, sample_tokens, batch_size, seed"),
    ("{source: mix, tokens: 10, corpus: {source: missing.txt}}", "data.corpus.source: file not found: missing.txt"),
])
def test_bad_teacher_data_is_one_line_naming_the_field(tmp_path, capsys, monkeypatch, data, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(recipe(tmp_path, tmp_path / "out", data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: {message}" in err
