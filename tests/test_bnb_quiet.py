"""bitsandbytes imported after llmshrink prints nothing: llmshrink's own import skips its fetch of a CPU kernel
from the kernel hub (llmshrink/bnb.py), and the lines about that kernel are dropped whoever imports it
(llmshrink/quiet.py). On a CPU without AVX512-BF16 bitsandbytes fetches nothing and these hold trivially."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")


def run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_llmshrink_imports_bitsandbytes_quietly_and_without_the_kernel_hub():
    out = run("import sys\nfrom llmshrink.bnb import import_bnb\nimport_bnb('test')\n"
              "print('kernels' in sys.modules)\nimport kernels\nprint(kernels.__name__)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "kernels"]  # not imported by bitsandbytes, importable after
    assert out.stderr == ""


def test_bitsandbytes_imported_by_peft_after_llmshrink_is_quiet():
    out = run("import llmshrink\nfrom peft.import_utils import is_bnb_4bit_available\n"
              "print(is_bnb_4bit_available())")
    assert out.returncode == 0 and out.stdout.split() == ["True"], out.stderr[-3000:]
    assert out.stderr == ""
