"""Bad input a user controls is one exact line on stderr and exit code 2: broken local model folders,
dataset ids and configs, templates that fail on a record, unwritable output folders, `llmshrink eval`'s
path, device, tokenizer and task names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import one_line, save_tiny, tiny_llama

from llmshrink.distill.data import load_texts, stream_texts
from llmshrink.errors import LlmshrinkError
from llmshrink.specs import DataSpec


def recipe(tmp_path: Path, model: Path, data: str, out: Path | None = None) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"""\
name: bad
device: cpu
model: {{id: '{model}'}}
data: {{{data}}}
stages:
  - distill: {{steps: 1, batch_size: 1, seq_len: 8, warmup_steps: 0}}
evaluate: {{perplexity: null, latency: null, memory: false, macs: false}}
output: {{dir: '{out or tmp_path / "out"}'}}
""")
    return path



@pytest.fixture
def text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the a of and to in is was he she it that\n" * 40)
    return path


# --- the model folder ---------------------------------------------------------------------------


@pytest.mark.parametrize("case, expected", [
    ("broken config", "{m}/config.json: cannot read the model config: It looks like the config file at "
                      "'{m}/config.json' is not a valid JSON file."),
    ("no weights", "{m} has no weights (model.safetensors or pytorch_model.bin): "
                   "not a complete Hugging Face model directory"),
    ("bad weights", "cannot load the weights in {m}: Error while deserializing header: header too small"),
    ("bad tokenizer", "cannot load a tokenizer from {m}: Expecting value: line 1 column 1 (char 0)"),
])
def test_a_broken_local_model_folder_is_one_line(case, expected, tmp_path, tiny_llama_dir, text, capsys):
    m = tiny_llama_dir
    if case == "broken config":
        (m / "config.json").write_text('{"model_type": "llama",')
    elif case == "no weights":
        (m / "model.safetensors").unlink()
    elif case == "bad weights":
        (m / "model.safetensors").write_text("garbage")
    else:
        (m / "tokenizer.json").write_text("not json")
    line = one_line(capsys, ["apply", str(recipe(tmp_path, m, f"source: '{text}'"))])
    assert line == "llmshrink: error: model.id: " + expected.format(m=m)


# --- datasets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raised, spec, expected", [
    (ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)"), {},
     "data.source: cannot load dataset 'wikitext' (offline?): use a local .txt/.jsonl file or builtin:shakespeare"),
    ("not found", {},
     "data.source: Dataset 'wikitext' doesn't exist on the Hub or cannot be accessed. "
     "(a typo? a private or gated dataset needs `hf auth login`)"),
    (ValueError("Config name is missing.\nPlease pick one among the available configs: ['wikitext-103-raw-v1', "
                "'wikitext-2-raw-v1']\nExample of usage:\n\t`load_dataset('wikitext', 'wikitext-103-raw-v1')`"), {},
     "data.config: not given, and dataset 'wikitext' has several; pick one of: wikitext-103-raw-v1, wikitext-2-raw-v1"),
    (ValueError("BuilderConfig 'wikitext-2' not found. Available: ['wikitext-103-raw-v1', 'wikitext-2-raw-v1']"),
     {"config": "wikitext-2"},
     "data.config: 'wikitext-2' is not a config of dataset 'wikitext' (did you mean wikitext-2-raw-v1?); "
     "available: wikitext-103-raw-v1, wikitext-2-raw-v1"),
    (ValueError("Unknown split \"tran\". Should be one of ['train', 'test']."), {"split": "tran"},
     "data.split: 'tran' is not a split of dataset 'wikitext' (did you mean train?); available: train, test"),
])
def test_dataset_errors_say_which_cause(raised, spec, expected, monkeypatch):
    from datasets.exceptions import DatasetNotFoundError

    if raised == "not found":
        raised = DatasetNotFoundError("Dataset 'wikitext' doesn't exist on the Hub or cannot be accessed.")

    def load_dataset(*args, **kwargs):  # what datasets 5 raises for each cause (no network needed)
        raise raised

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    for streaming in (False, True):
        data = DataSpec(source="wikitext", streaming=streaming, max_tokens=10, **spec)
        with pytest.raises(LlmshrinkError) as err:
            list(stream_texts(data)) if streaming else load_texts(data)
        assert str(err.value) == expected


def test_a_template_failing_on_one_record_names_the_record_and_field(tmp_path, tiny_llama_dir, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [{"q": "the a", "a": "of"}, {"q": "he she"}, {"q": "it", "a": "to"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_line(capsys, ["apply", str(recipe(tmp_path, tiny_llama_dir, f"source: '{data}', template: '{{q}} {{a}}'"))])
    assert line == (f"llmshrink: error: data.template: record 1 of {data}: field 'a' is empty (null); "
                    "fill it in, or leave the record out of the file")


def test_a_template_that_bypassed_validation_fails_as_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"q": "the"}) + "\n")
    spec = DataSpec.model_construct(source=str(data), template="{0} {q}")  # recipes refuse {0}; the library may not
    with pytest.raises(LlmshrinkError) as err:
        load_texts(spec)
    assert str(err.value) == (f"data.template: record 0 of {data}: cannot fill '{{0}} {{q}}': "
                              "Format string contains positional fields")


# --- the output folder --------------------------------------------------------------------------


def test_an_output_folder_under_a_file_is_refused_before_loading(tmp_path, text, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "sub" / "out"
    line = one_line(capsys, ["apply", str(recipe(tmp_path, tmp_path / "no-model", f"source: '{text}'", out))])
    assert line == f"llmshrink: error: output.dir: cannot create {out}: {blocker} is a file, not a directory"


def test_an_unwritable_output_folder_is_refused_before_loading(tmp_path, text, capsys, monkeypatch):
    import tempfile

    def mkdtemp(*args, **kwargs):  # a read-only parent (chmod does not stop root, who may run the tests)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    out = tmp_path / "ro" / "out"
    line = one_line(capsys, ["apply", str(recipe(tmp_path, tmp_path / "no-model", f"source: '{text}'", out))])
    assert line == f"llmshrink: error: output.dir: cannot create {out}: {tmp_path} is not writable (Permission denied)"


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/sys").is_dir(), reason="needs a read-only /sys")
def test_a_read_only_file_system_is_refused(tmp_path, text, capsys):
    out = Path("/sys/llmshrink-test/out")
    line = one_line(capsys, ["apply", str(recipe(tmp_path, tmp_path / "no-model", f"source: '{text}'", out))])
    assert line.startswith(f"llmshrink: error: output.dir: cannot create {out}: /sys is not writable (")


# --- llmshrink eval -----------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny(tiny_llama(), tmp_path / "ckpt")


def test_eval_refuses_a_folder_that_is_not_a_checkpoint(tiny_llama_dir, tmp_path, capsys):
    line = one_line(capsys, ["eval", str(tiny_llama_dir), "--tasks", "x"])
    assert line == (f"llmshrink: error: eval: {tiny_llama_dir} is not an llmshrink checkpoint (no llmshrink.json); "
                    "give a directory written by llmshrink apply")
    line = one_line(capsys, ["eval", str(tmp_path / "nope"), "--tasks", "x"])
    assert line == f"llmshrink: error: eval: {tmp_path / 'nope'}: no such checkpoint directory"


@pytest.mark.parametrize("device, expected", [
    ("gpu", "'gpu' is not a device; use cpu, cuda or cuda:N"),
    ("cuda:x", "'cuda:x' is not a device; use cpu, cuda or cuda:N"),
    ("meta", "'meta' is not supported here; use cpu, cuda or cuda:N"),
])
def test_eval_refuses_a_bad_device_before_loading(device, expected, tmp_path, capsys):
    line = one_line(capsys, ["eval", str(tmp_path / "nope"), "--tasks", "x", "--device", device])
    assert line == f"llmshrink: error: --device: {expected}"


def test_eval_refuses_cuda_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    line = one_line(capsys, ["eval", str(tmp_path), "--tasks", "x", "--device", "cuda"])
    assert line == "llmshrink: error: --device: 'cuda' requested but no CUDA device is available; use cpu"


def test_eval_names_an_unreadable_tokenizer(checkpoint, capsys):
    (checkpoint / "tokenizer.json").write_text("not json")
    line = one_line(capsys, ["eval", str(checkpoint), "--tasks", "x"])
    assert line == (f"llmshrink: error: eval: cannot load the tokenizer of {checkpoint}: "
                    "JSONDecodeError: Expecting value: line 1 column 1 (char 0)")


def test_eval_names_a_missing_task_file(checkpoint, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    line = one_line(capsys, ["eval", str(checkpoint), "--tasks", str(missing)])
    assert line == f"llmshrink: error: lm_eval.tasks: no such task file: {missing}"


def test_eval_suggests_the_closest_task(checkpoint, tmp_path, capsys):
    """Looking a name up in lm-eval's registry indexes its ~15k task YAMLs once (~15 s)."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: my_tiny_ppl\ndataset_path: json\noutput_type: loglikelihood_rolling\n"
                                     "test_split: train\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                                     "metric_list: [{metric: word_perplexity}]\n")
    line = one_line(capsys, ["eval", str(checkpoint), "--tasks", "my_tiny_pp", "--include-path", str(tasks)])
    assert line == (f"llmshrink: error: lm_eval.tasks: unknown task 'my_tiny_pp' (did you mean my_tiny_ppl?); "
                    f"local tasks in {tasks.resolve()}: my_tiny_ppl; lm-eval registry tasks (`lm_eval ls tasks`) "
                    "also work but download their data from the Hugging Face hub")


def test_eval_refuses_an_output_file_in_a_missing_folder_before_evaluating(tmp_path, capsys):
    out = tmp_path / "missing" / "ev.json"
    line = one_line(capsys, ["eval", str(tmp_path / "nope"), "--tasks", "x", "--output", str(out)])
    assert line == f"llmshrink: error: --output: {out.parent} is not a directory; create it first"


def test_an_encoder_recipe_needs_a_task_of_its_kind_and_no_text_measurements(tmp_path, capsys, text):
    path = recipe(tmp_path, tmp_path / "never-loaded", f"source: '{text}'")
    plain = path.read_text()
    cases = [
        ("model: {task: embedding, id: ", "", "task: required for model.task embedding: the similarity task it is "
                                             "scored on"),
        ("model: {task: sequence_classification, id: ", "task: {kind: similarity, source: builtin:similarity}\n",
         "task.kind: model.task sequence_classification is scored on a classification task, got 'similarity'"),
        ("model: {id: ", "task: {kind: similarity, source: builtin:similarity}\n",
         "task: only for encoders (model.task: sequence_classification or embedding); model.task is causal_lm"),
    ]
    for model, task, message in cases:
        path.write_text(task + plain.replace("model: {id: ", model))
        assert one_line(capsys, ["validate", str(path)]) == f"llmshrink: error: {path}: {message}"
    path.write_text("task: {kind: similarity, source: builtin:similarity}\n"
                    + plain.replace("model: {id: ", "model: {task: embedding, id: ").replace(
                        "perplexity: null", "perplexity: {window: 64}"))
    assert one_line(capsys, ["validate", str(path)]) == (
        f"llmshrink: error: {path}: evaluate.perplexity: measures a language model's text; an encoder is scored on "
        "its task: section (remove it, or set it to null)")
    path.write_text("task: {kind: similarity, source: builtin:similarity}\n"
                    + plain.replace("model: {id: ", "model: {task: embedding, id: ").replace(
                        f"data: {{source: '{text}'}}", "data: {source: teacher, tokens: 1000}"))
    assert one_line(capsys, ["validate", str(path)]) == (
        f"llmshrink: error: {path}: data.source: teacher samples text from a causal LM; an encoder's unlabeled text "
        "is a corpus: builtin:NAME, a datasets hub id or a local file")
