"""Exports of a compressed checkpoint to formats that run without llmshrink, each verified in its runtime.

    hf_dense.py   a plain transformers model: every compressed layer multiplied back to a dense one, pruned
                  shapes in the config; reloaded with plain `from_pretrained` and its logits compared

This package __init__ imports nothing: each format is imported where it is used (they pull in their runtimes).
"""
