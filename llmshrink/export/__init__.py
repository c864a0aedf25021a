"""Exports of a compressed checkpoint to formats that run without llmshrink, each verified in its runtime.

    hf_dense.py   a plain transformers model: every compressed layer multiplied back to a dense one, pruned
                  shapes in the config; reloaded with plain `from_pretrained` and its logits compared
    gguf.py       one GGUF file for llama.cpp (llama / deci for per-block widths and heads / gpt2), with its tokenizer;
                  quantized by llama.cpp; loaded in llama.cpp, tokenizer and logits compared (the `export` extra)
    gguf_runtime.py  llama.cpp through llama-cpp-python: quantize, load, logits, tokenize, perplexity
    onnx.py       one ONNX graph (KV cache in/out; fp32, int8, int8/int4-weights), checked in onnxruntime
    onnx_run.py   running it: OnnxModel, greedy, onnx_perplexity, decode_speed
    gguf_vocab.py  the tokenizer written into a GGUF
    staging.py    what every export shares: the destination check, the staged folder, export.json
    spec.py       the recipe's export: section (torch-free); from_recipe.py runs it and dispatches by format

This package __init__ imports nothing: each format is imported where it is used (they pull in their runtimes).
"""
