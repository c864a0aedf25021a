"""lm-eval in memory (run_lm_eval) against the plain `lm_eval` CLI, hand-computed metrics, and errors."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import quiet_ctx, save_tiny, tiny_gpt2, tiny_llama, tiny_tokenizer
from pydantic import ValidationError

from llmshrink.checkpoint_load import load_checkpoint, load_tokenizer
from llmshrink.errors import LlmshrinkError
from llmshrink.eval.lm_eval_bridge import LmEvalSpec, _compact, evals_dir, local_tasks, run_lm_eval
from llmshrink.passes.low_rank import LowRankConfig, apply

ROOT = Path(__file__).resolve().parents[1]
PPL, MC, GEN = "llmshrink_shakespeare_ppl", "llmshrink_commonsense_mc", "llmshrink_short_answers"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama with low-rank MLPs, saved as a checkpoint that carries its own remote code."""
    model = tiny_llama()
    apply(model, LowRankConfig(targets=r".*\.mlp\..*", rank=8), quiet_ctx())
    return save_tiny(model, tmp_path_factory.mktemp("lm-eval") / "ckpt")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_in_memory_numbers_equal_the_plain_lm_eval_cli(checkpoint, tmp_path):
    tasks, limit = [PPL, MC, GEN], 6
    cli = subprocess.Popen(  # runs while the in-memory evaluation below does; from elsewhere than the repo root
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
         f"pretrained={checkpoint},trust_remote_code=True,dtype=float32", "--tasks", ",".join(tasks),
         "--include_path", str(ROOT / "llmshrink" / "evals"), "--device", "cpu", "--batch_size", "1", "--limit", str(limit),
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    model, tokenizer = load_checkpoint(checkpoint), load_tokenizer(checkpoint)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "LowRankLinear"
    pad_before = tokenizer.pad_token
    model.train()
    random.seed(7)
    torch.manual_seed(7)
    expected_draw = (random.random(), torch.rand(1).item())
    random.seed(7)
    torch.manual_seed(7)
    spec = LmEvalSpec(tasks=tasks, limit=limit)
    ours = run_lm_eval(model, tokenizer, **spec.model_dump(), log=lambda _: None)
    assert (random.random(), torch.rand(1).item()) == expected_draw  # lm-eval's reseeding did not leak
    assert model.training and tokenizer.pad_token == pad_before  # caller's model mode and tokenizer kept

    output, _ = cli.communicate(timeout=300)
    assert cli.returncode == 0, output[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    theirs = {task: _compact(row) for task, row in json.loads(results_file.read_text())["results"].items()}
    assert set(ours["results"]) == set(theirs) == set(tasks)
    for task in tasks:
        assert set(ours["results"][task]) == set(theirs[task]), task
        for metric, value in theirs[task].items():
            assert ours["results"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    ppl = ours["results"][PPL]
    assert set(ppl) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert ppl["byte_perplexity"] == pytest.approx(2 ** ppl["bits_per_byte"], rel=1e-9)
    assert 1.0 < ppl["byte_perplexity"] < ppl["word_perplexity"]
    assert set(ours["results"][MC]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert all(0.0 <= ours["results"][MC][m] <= 1.0 for m in ("acc", "acc_norm"))

    protocol = ours["protocol"]
    assert protocol["tasks"][MC]["samples"] == limit and protocol["tasks"][MC]["of"] == 50
    assert protocol["tasks"][PPL]["source"] == f"evals/{PPL}.yaml"
    assert protocol["lm_eval_version"] and len(protocol["tasks"][GEN]["data_sha256"]) == 64
    assert protocol["command"].startswith("lm_eval --model hf --model_args pretrained=CHECKPOINT,")


def test_rolling_perplexity_matches_a_hand_computation(tmp_path):
    """word_perplexity = exp(-Σ log p / words) with every token predicted after the BOS prefix."""
    docs = ["the time was out and she said no more to them", "it is what they had not been for some time"]
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (task_dir / "hand_ppl.yaml").write_text(
        f"task: hand_ppl\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {task_dir / 'docs.jsonl'}}}}}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]\n"
    )
    model, tokenizer = tiny_llama(seed=3), tiny_tokenizer()
    out = run_lm_eval(model, tokenizer, "hand_ppl", include_path=task_dir, log=lambda _: None)["results"]
    again = run_lm_eval(model, tokenizer, ["hand_ppl"], include_path=task_dir, log=lambda _: None)["results"]
    assert again == out  # the cached task index builds fresh tasks: a second run is identical

    total = 0.0
    with torch.no_grad():
        for doc in docs:
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            inputs = torch.tensor([[tokenizer.bos_token_id, *ids]])
            logprobs = model(inputs).logits[0, :-1].log_softmax(-1)
            total += float(logprobs.gather(1, torch.tensor(ids)[:, None]).sum())
    words = sum(len(d.split()) for d in docs)
    assert out["hand_ppl"]["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-5)
    assert out["hand_ppl"]["bits_per_byte"] == pytest.approx(-total / sum(map(len, docs)) / math.log(2), rel=1e-5)


def test_generation_is_scored_by_exact_match_after_strip_and_case(tmp_path):
    """A GPT-2 whose final layer norm always points at one word: it answers that word to everything."""
    model, tokenizer = tiny_gpt2(), tiny_tokenizer()
    word = "time"
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(10 * model.transformer.wte.weight[tokenizer.convert_tokens_to_ids(word)])
        assert tokenizer.decode(model(torch.tensor([[5, 9, 2]])).logits[0].argmax(-1)) == f"{word} {word} {word}"
    answers = ["time", "TIME.", "no", "out"]  # case and punctuation are ignored: 2 of 4 are right
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "qa.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "a": a}) + "\n" for i, a in enumerate(answers)))
    shipped = (ROOT / "llmshrink" / "evals" / f"{GEN}.yaml").read_text()
    metrics = shipped[shipped.index("metric_list:"):shipped.index("metadata:")]
    (task_dir / "qa.yaml").write_text(
        f"task: qa\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {task_dir / 'qa.jsonl'}}}}}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs: {until: ['\\n'], do_sample: false, max_gen_toks: 1}\n" + metrics
    )
    out = run_lm_eval(model, tokenizer, ["qa"], include_path=task_dir, log=lambda _: None)["results"]
    assert out["qa"]["exact_match"] == pytest.approx(0.5)


def test_shipped_tasks_and_data():
    assert evals_dir() == ROOT / "llmshrink" / "evals"
    assert {PPL, MC, GEN, "llmshrink_offline"} <= set(local_tasks())
    data = ROOT / "llmshrink" / "evals" / "data"
    mc = read_jsonl(data / "commonsense_cloze.jsonl")
    assert len(mc) == 50 and len({row["question"] for row in mc}) == 50
    assert all(len(set(row["choices"])) == 4 and row["label"] in range(4) for row in mc)
    assert sorted({row["label"] for row in mc}) == [0, 1, 2, 3]  # the right answer is not always in one place
    qa = read_jsonl(data / "short_answers.jsonl")
    assert len(qa) == 30 and all(row["answer"] and "\n" not in row["answer"] for row in qa)
    # the perplexity docs are verbatim paragraphs of the held-out Tempest text (blank lines normalised)
    source = re.sub(r"\n\s*\n", "\n\n", (ROOT / "llmshrink" / "data" / "shakespeare_test.txt").read_text())
    docs = [row["text"] for row in read_jsonl(data / "shakespeare_tempest_excerpt.jsonl")]
    assert len(docs) == 10 and 6_000 < sum(map(len, docs)) < 10_000
    assert all(doc in source for doc in docs)


def test_compact_drops_the_filter_suffix_only_when_unambiguous():
    row = {"alias": "t", "sample_len": 4, "acc,none": 0.5, "acc_stderr,none": "N/A",
           "exact_match,strict": 0.25, "exact_match,flexible": 0.75, "bits_per_byte,strip": 1.5}
    assert _compact(row) == {"acc": 0.5, "exact_match,strict": 0.25, "exact_match,flexible": 0.75,
                             "bits_per_byte": 1.5}


def test_bad_input_is_one_clear_error(tmp_path):
    model, tokenizer = tiny_gpt2(), tiny_tokenizer()
    with pytest.raises(LlmshrinkError, match=r"^lm_eval.include_path: .*nope is not a directory"):
        run_lm_eval(model, tokenizer, [MC], include_path=tmp_path / "nope")
    with pytest.raises(LlmshrinkError, match=r"^lm_eval.tasks: \[\] is not allowed; give one or more task names$"):
        run_lm_eval(model, tokenizer, [])
    with pytest.raises(LlmshrinkError, match=r"^lm_eval.limit: 0 is not allowed"):
        run_lm_eval(model, tokenizer, [MC], limit=0)
    with pytest.raises(LlmshrinkError, match="lm-eval needs a transformers model"):
        run_lm_eval(torch.nn.Linear(2, 2), tokenizer, [MC])
    with pytest.raises(ValidationError):
        LmEvalSpec(tasks=[])
    with pytest.raises(ValidationError):
        LmEvalSpec(tasks=[MC], limt=3)


def test_unknown_and_offline_registry_tasks(tmp_path):
    model, tokenizer = tiny_gpt2(), tiny_tokenizer()
    with pytest.raises(LlmshrinkError) as info:
        run_lm_eval(model, tokenizer, [MC, "llmshrink_comonsense_mc"])
    message = str(info.value)
    assert message.startswith("lm_eval.tasks: unknown task 'llmshrink_comonsense_mc' (did you mean llmshrink_commonsense_mc?)")
    assert f"{PPL}, " in message and "Hugging Face hub" in message and "\n" not in message
    with pytest.raises(LlmshrinkError, match=r"^lm_eval.tasks: .*hellaswag.*Hugging Face hub"):
        run_lm_eval(model, tokenizer, ["hellaswag"], limit=1)  # a registry task: known, but its data is not here
