"""`llmshrink export`: hf-dense through the command line (gguf and onnx: their own test files); an unknown format
and a quantization hf-dense cannot take refused in one line, exit 2."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny
from test_export_hf_dense import compress

from llmshrink.cli import main


def test_export_hf_dense_writes_a_verified_plain_model(tmp_path, capsys):
    checkpoint = save_tiny(compress("llama", [("drop_layers", {"layers": [0]})]), tmp_path / "ckpt")
    assert main(["export", str(checkpoint), "--format", "hf-dense", "-o", str(tmp_path / "dense")]) == 0
    result = json.loads((tmp_path / "dense" / "export.json").read_text())
    assert result["format"] == "hf-dense" and result["max_abs_logit_diff"] <= 1e-6
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.startswith(f"exported {checkpoint} -> {tmp_path / 'dense'} (hf-dense): max |Δlogit| ")


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "tflite"], "--format: 'tflite' is not a format; allowed: hf-dense, gguf, onnx"),
    (["--format", "hf-dense", "--quant", "q8_0"],
     "--quant: hf-dense keeps the checkpoint's dtype; quantize with --format gguf or onnx"),
])
def test_unknown_formats_and_misplaced_quant_are_one_line(tmp_path, capsys, args, message):
    assert main(["export", str(tmp_path), *args, "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"llmshrink: error: {message}\n"
    assert not (tmp_path / "x").exists()
