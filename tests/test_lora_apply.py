"""`llmshrink apply` with a lora stage: adapters trained by distill, then merged into the checkpoint or
saved beside it in peft's format."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llmshrink.checkpoint_load import load_checkpoint
from llmshrink.cli import main

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])


def recipe_text(model_dir, text_file, out_dir, merge: bool) -> str:
    return f"""\
name: tiny-lora
model: {{id: {model_dir}}}
data: {{source: {text_file}}}
stages:
  - low_rank: {{targets: '.*mlp\\.c_fc', rank: 8}}
  - lora: {{r: 4, alpha: 8, targets: '.*attn\\.c_attn', merge: {str(merge).lower()}}}
  - distill: {{steps: 3, batch_size: 2, seq_len: 32, warmup_steps: 1, lr: 1.0e-2}}
evaluate:
  perplexity: {{data: {{source: {text_file}, max_tokens: 300}}, window: 32, stride: 16}}
  memory: false
output: {{dir: {out_dir}}}
"""


@pytest.mark.parametrize("merge", [True, False])
def test_lora_recipe_merges_or_saves_a_peft_adapter(tmp_path, tiny_model_dir, tiny_text, merge):
    out = tmp_path / "out"
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe_text(tiny_model_dir, tiny_text, out, merge))
    assert main(["apply", str(path)]) == 0
    manifest = json.loads((out / "llmshrink.json").read_text())
    trained = manifest["passes"][2]["record"]["trained_params"]
    assert trained == manifest["passes"][1]["record"]["adapter_params"] == 2 * 4 * (64 + 192)  # 2 c_attn layers
    model = load_checkpoint(out)
    assert not any("lora_" in name for name, _ in model.named_parameters())  # the base checkpoint is plain
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if merge:
        assert not (out / "adapter").exists() and "adapter" not in manifest
        with torch.no_grad():  # the trained adapters are in the attention weights now
            assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
        return
    assert manifest["adapter"] == {"dir": "adapter", "merged": False}
    assert manifest["checks"]["adapter_reload_max_abs_logit_diff"] < 1e-5
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    with torch.no_grad():  # the adapters are not merged: attention weights as loaded, the adapter changes logits
        assert torch.equal(model.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
        plain = model(IDS).logits
        adapted = PeftModel.from_pretrained(model, out / "adapter")(IDS).logits
    assert (adapted - plain).abs().max() > 1e-4


QLORA = """\
name: tiny-qlora
model: {{id: {model_dir}}}
data: {{source: {text_file}}}
stages:
  - quantize: {{method: bnb-nf4}}
  - lora: {{r: 4, alpha: 8, merge: {merge}}}
  - distill: {{steps: 3, batch_size: 2, seq_len: 32, warmup_steps: 1, lr: 1.0e-2}}
evaluate:
  perplexity: {{data: {{source: {text_file}, max_tokens: 300}}, window: 32, stride: 16}}
  latency: null
  memory: false
output: {{dir: {out_dir}}}
"""


def test_qlora_trains_adapters_on_a_4bit_base_that_plain_peft_loads(tmp_path, tiny_llama_dir, tiny_text):
    out = tmp_path / "out"
    path = tmp_path / "qlora.yaml"
    path.write_text(QLORA.format(model_dir=tiny_llama_dir, text_file=tiny_text, out_dir=out, merge="false"))
    assert main(["apply", str(path)]) == 0
    manifest = json.loads((out / "llmshrink.json").read_text())
    # every Linear inside the 2 blocks: q (64x64), k, v (64->32, GQA), o, gate/up (64->192), down (192->64)
    adapter_params = 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 192) * 3)
    assert manifest["passes"][1]["record"]["adapter_params"] == adapter_params
    assert manifest["passes"][2]["record"]["trained_params"] == adapter_params  # only the adapters train
    assert manifest["checks"]["adapter_reload_max_abs_logit_diff"] < 1e-5

    # The QLoRA way, without llmshrink's loader: transformers loads the 4-bit checkpoint, peft the adapter.
    plain = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    assert type(plain.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    portable = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    for module in portable.modules():  # the kernel path llmshrink keeps (llmshrink/bnb.py _settle)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        before = plain(IDS).logits
        adapted = PeftModel.from_pretrained(plain, out / "adapter")(IDS).logits
        ours = load_checkpoint(out)(IDS).logits
        assert torch.equal(ours, portable(IDS).logits)
    if getattr(plain.model.layers[0].mlp.up_proj.weight.quant_state, "packing_format_for_cpu", False):
        assert float((before - ours).norm() / ours.norm()) < 1e-2  # bnb's bf16 kernel: the README's bound
    else:
        assert torch.equal(before, ours)
    assert (adapted - before).abs().max() > 1e-4  # the trained adapter changes the output


def test_qlora_merge_is_refused_in_one_line(tmp_path, tiny_llama_dir, tiny_text, capsys):
    out = tmp_path / "out"
    path = tmp_path / "qlora.yaml"
    path.write_text(QLORA.format(model_dir=tiny_llama_dir, text_file=tiny_text, out_dir=out, merge="true"))
    assert main(["apply", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("llmshrink: error: lora.merge: model.layers.0.self_attn.q_proj is a bitsandbytes Linear4bit: "
                   "merging re-quantizes the weights, so the merged model would not compute what was trained; "
                   "use merge: false (QLoRA keeps the adapter beside the quantized model)")
    assert not out.exists()
