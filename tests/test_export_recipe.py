"""The recipe's `export:` section (llmshrink/export/spec.py): `apply` writes each export from the verified checkpoint
into <output>/exports/<name>/ before the output appears, lists it in llmshrink.json and the model card; a failed
export fails the run and leaves no output; what can be checked without the model is refused in one line at
validation."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import model_dir, one_line, tiny_llama

import llmshrink.export.hf_dense as hf_dense
from llmshrink.cli import main
from llmshrink.engine import work_dir_for
from llmshrink.errors import LlmshrinkError
from llmshrink.export.onnx_run import INSTALL

ONNX_RUNTIME = ("onnx", "onnxscript", "onnxruntime")


def write_recipe(path, model, text, out, export: str, task: str = "") -> str:
    path.write_text(f"""\
name: tiny-export
model: {{id: '{model}'{task}}}
stages:
  - prune_ffn: {{keep: 0.5, importance: magnitude}}
evaluate:
  perplexity: {{data: {{source: '{text}', max_tokens: 200}}, window: 32, stride: 32}}
  latency: null
  memory: false
  macs: false
  after_each_stage: false
export: {export}
output: {{dir: '{out}'}}
""")
    return str(path)


def failed_apply(capsys, path) -> tuple[str, str]:
    """`apply` exits 2 and the last line on stderr (after the progress bars) is the one-line error: (it, stdout)."""
    code = main(["apply", path])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1], out


def apply(tmp_path, model, text, export: str) -> tuple[int, object]:
    out = tmp_path / "runs" / "out"
    return main(["apply", write_recipe(tmp_path / "r.yaml", model, text, out, export)]), out


def check_published(out, names: list[str]) -> dict:
    manifest = json.loads((out / "llmshrink.json").read_text())
    assert list(manifest["exports"]) == names
    assert sorted(p.name for p in (out / "exports").iterdir()) == sorted(names)
    card = (out / "README.md").read_text()
    assert "## Exports" in card
    for name, record in manifest["exports"].items():
        folder = out / "exports" / name
        assert json.loads((folder / "export.json").read_text()) == record  # the same record, paths relative
        assert record["source"] == "." and record["path"].startswith(f"exports/{name}")
        assert (out / record["path"]).exists()
        assert f"`{record['path']}`" in card
        assert record["top1_agreement"] == 1.0
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no work folder, no temporary sibling
    return manifest


def test_apply_writes_hf_dense_beside_the_checkpoint(tmp_path, tiny_text):
    model = model_dir(tiny_llama(), tmp_path / "llama")
    code, out = apply(tmp_path, model, tiny_text, "[{format: hf-dense}, {format: hf-dense, name: plain2}]")
    assert code == 0
    manifest = check_published(out, ["hf-dense", "plain2"])
    record = manifest["exports"]["hf-dense"]
    assert record["format"] == "hf-dense" and record["path"] == "exports/hf-dense"
    assert record["checked_max_abs_diff"] <= record["tolerance"]
    # The exported folder is a plain transformers model with its pruned width.
    config = json.loads((out / "exports" / "hf-dense" / "config.json").read_text())
    assert config["intermediate_size"] == 96 and "auto_map" not in config
    # The exports are not counted in the checkpoint's size.
    assert manifest["metrics"]["compressed"]["size_bytes"] == (out / "model.safetensors").stat().st_size


def test_apply_with_hf_dense_and_onnx(tmp_path, tiny_text):
    for name in ONNX_RUNTIME:
        pytest.importorskip(name, reason=f"the ONNX export needs {name}: {INSTALL}")
    model = model_dir(tiny_llama(), tmp_path / "llama")
    code, out = apply(tmp_path, model, tiny_text, "[{format: hf-dense}, {format: onnx}]")
    assert code == 0
    manifest = check_published(out, ["hf-dense", "onnx"])
    assert manifest["exports"]["onnx"]["path"] == "exports/onnx" and (out / "exports" / "onnx" / "model.onnx").is_file()


def test_apply_with_gguf_q8_0(tmp_path, tiny_text):
    pytest.importorskip("llama_cpp", reason='the GGUF export needs llama-cpp-python: pip install -e ".[export]"')
    from test_export_gguf import TOKENIZER, VOCAB  # a tokenizer llama.cpp reproduces

    path = tmp_path / "llama"
    tiny_llama(vocab_size=VOCAB).save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    code, out = apply(tmp_path, path, tiny_text, "[{format: gguf, quant: q8_0}]")
    assert code == 0
    record = check_published(out, ["gguf-q8_0"])["exports"]["gguf-q8_0"]
    assert record["quant"] == "q8_0" and record["path"] == "exports/gguf-q8_0/model-q8_0.gguf"


def test_a_failed_export_leaves_no_output(tmp_path, tiny_text, capsys, monkeypatch):
    real, calls = hf_dense.export_hf_dense, []

    def second_fails(checkpoint, out, log=print):
        calls.append(out)
        if len(calls) == 2:
            raise LlmshrinkError("hf-dense: simulated failure")
        return real(checkpoint, out, log=log)

    monkeypatch.setattr(hf_dense, "export_hf_dense", second_fails)
    model = model_dir(tiny_llama(), tmp_path / "llama")
    out = tmp_path / "runs" / "out"
    path = write_recipe(tmp_path / "r.yaml", model, tiny_text, out, "[{format: hf-dense}, {format: hf-dense, name: b}]")
    assert failed_apply(capsys, path)[0] == "llmshrink: error: hf-dense: simulated failure"
    assert len(calls) == 2 and not calls[0].exists()  # the first export was written, then dropped with the rest
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("export, module, start", [
    ("[{format: onnx, quant: int8}]", "onnxruntime", "onnx: the export needs onnxruntime, not installed"),
    ("[{format: hf-dense}, {format: gguf}]", "llama_cpp", "gguf: the GGUF export writes and checks the file with"),
])
def test_missing_runtime_fails_first_in_one_line_naming_the_install(export, module, start, tmp_path, tiny_text,
                                                                     capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    model = model_dir(tiny_llama(), tmp_path / "llama")
    out = tmp_path / "runs" / "out"
    path = write_recipe(tmp_path / "r.yaml", model, tiny_text, out, export)
    line, log = failed_apply(capsys, path)
    assert line.startswith(f"llmshrink: error: {start}") and 'pip install -e ".[export]"' in line
    assert "prune_ffn" not in log  # refused before the model loads and the stages run
    assert not out.exists() and not work_dir_for(out).exists()


@pytest.mark.parametrize("export, task, message", [
    ("[{format: tflite}]", "", "export[0].format: input should be 'hf-dense', 'gguf' or 'onnx', got 'tflite'"),
    ("[{format: gguf, quant: int8}]", "",
     "export[0].quant: gguf takes one of f32, f16, q8_0, q4_0, q4_k, q5_k, q6_k, got 'int8'"),
    ("[{format: onnx, quant: q8_0}]", "",
     "export[0].quant: onnx takes one of int8, int8-weights, int4-weights, got 'q8_0'"),
    ("[{format: hf-dense, quant: q8_0}]", "",
     "export[0].quant: hf-dense keeps the checkpoint's dtype (remove quant, or quantize with format gguf or onnx), "
     "got 'q8_0'"),
    ("[{format: gguf}, {format: onnx, name: gguf}]", "",
     "export[1].name: duplicate export folder 'gguf' (also export[0]); give one of them a name:"),
    ("[{format: onnx, quant: int8}, {format: onnx, quant: int8}]", "",
     "export[1].name: duplicate export folder 'onnx-int8' (also export[0]); give one of them a name:"),
    ("[{format: onnx, name: a/b}]", "", "export[0].name: string should match pattern "
                                        "'^[A-Za-z0-9][A-Za-z0-9._-]*$', got 'a/b'"),
    ("[{format: hf-dense, level: 3}]", "", "export[0].level: unknown key; allowed: format, quant, name"),
    ("[{format: hf-dense}, {format: gguf, quant: q8_0}]", ", task: embedding",
     "export[1].format: gguf holds decoders (causal LMs); an encoder exports to hf-dense or onnx"),
])
def test_validation_refuses_in_one_line(tmp_path, tiny_text, capsys, export, task, message):
    extra = "\ntask: {kind: similarity, source: builtin:similarity}" if task else ""
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "model", tiny_text, tmp_path / "out", export, task)
    if task:  # an encoder is scored on its task:, not on perplexity
        text = (tmp_path / "r.yaml").read_text().replace(
            f"  perplexity: {{data: {{source: '{tiny_text}', max_tokens: 200}}, window: 32, stride: 32}}",
            "  perplexity: null") + extra
        (tmp_path / "r.yaml").write_text(text)
    assert one_line(capsys, ["validate", path]) == f"llmshrink: error: {path}: {message}"


def test_validation_accepts_the_section(tmp_path, tiny_text, capsys):
    from llmshrink.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", tmp_path / "model", tiny_text, tmp_path / "out",
                        "[{format: hf-dense}, {format: gguf}, {format: gguf, quant: q4_k}, {format: onnx, "
                        "quant: int4-weights, name: onnx4}]")
    recipe = load_recipe(path).recipe
    assert [spec.folder for spec in recipe.export] == ["hf-dense", "gguf", "gguf-q4_k", "onnx4"]
