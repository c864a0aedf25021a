"""`llmshrink export`: hf-dense through the command line; formats not built yet and unknown ones refused in one
line, exit 2."""

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


@pytest.mark.parametrize(("fmt", "message"), [
    ("gguf", "--format: gguf is not built yet in this version; available: hf-dense"),
    ("onnx", "--format: onnx is not built yet in this version; available: hf-dense"),
    ("tflite", "--format: 'tflite' is not a format; allowed: hf-dense, gguf, onnx"),
])
def test_formats_not_built_or_unknown_are_one_line(tmp_path, capsys, fmt, message):
    assert main(["export", str(tmp_path), "--format", fmt, "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"llmshrink: error: {message}\n"
    assert not (tmp_path / "x").exists()
