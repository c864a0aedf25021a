"""The planner's embeddings decision (bytes targets): the embedding tables and the lm_head stored in int8.

What these tests show, on tiny random Llama and GPT-2 models:
- A bytes search offers one embeddings decision (a group of its own, not a block's), params / MACs searches none,
  and `embeddings: false` removes it; asking for it with a params target is refused in one line.
- Below what the blocks' formats alone reach, the plan takes it: its stage has no `layers:`, the model after the
  planned stages holds exactly the planned bytes, and the tables and head are int8.
"""

from __future__ import annotations

import copy

import pytest
from conftest import tiny_gpt2, tiny_llama
from test_planning_target import context, run_stages, sizes, world  # noqa: F401  (world: the module fixture)

from llmshrink.cli import main
from llmshrink.modules.int8_dynamic import Int8DynamicLinear
from llmshrink.modules.int8_embedding import Int8Embedding
from llmshrink.planning import planner
from llmshrink.planning.candidates import EMBEDDINGS, make_candidates
from llmshrink.planning.spec import SearchSpec, TargetSpec

FORMATS = {"drop_layers": False, "prune_ffn": [], "prune_heads": [], "quantize": ["int8-dynamic"],
           "calibration_tokens": 64}


def test_only_a_bytes_search_offers_the_embeddings_decision():
    found = [c for c in make_candidates(4, SearchSpec(), "bytes") if c.block == EMBEDDINGS]
    assert [(c.slot, c.label) for c in found] == [("precision", "embeddings int8")]
    assert found[0].stage["quantize"]["method"] == "int8-dynamic" and "layers" not in found[0].stage["quantize"]
    for kind in ("params", "macs"):
        assert not any(c.block == EMBEDDINGS for c in make_candidates(4, SearchSpec(), kind))
    assert not any(c.block == EMBEDDINGS for c in make_candidates(4, SearchSpec(embeddings=False), "bytes"))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_below_the_blocks_formats_the_plan_stores_the_embeddings_in_int8(world, build):  # noqa: F811
    model = build(layers=4)
    ctx = context(world)
    budget = bytes_with_every_block_in_int8(model, ctx) - 1  # what the block formats alone cannot reach
    planned = planner.plan(model, TargetSpec(bytes=float(budget)), SearchSpec(**FORMATS), ctx, cache_dir=None,
                           log=lambda _: None)
    embedding_stages = [s for s in planned.stages if "layers" not in s["quantize"]]
    assert len(embedding_stages) == 1 and embedding_stages[0]["quantize"]["targets"] == "lm_head"
    run_stages(model, planned.stages, ctx)
    assert sizes(model) == planned.predicted and planned.predicted["bytes"] <= budget
    assert isinstance(model.get_output_embeddings(), Int8DynamicLinear)
    assert isinstance(model.get_input_embeddings(), Int8Embedding)


def bytes_with_every_block_in_int8(model, ctx) -> int:
    """Bytes of `model` with every block layer in int8 and the embeddings left as they are."""
    changed = copy.deepcopy(model)
    run_stages(changed, [{"quantize": {"method": "int8-dynamic"}}], ctx)
    return sizes(changed)["bytes"]


def test_the_embeddings_decision_is_refused_for_a_params_target(tmp_path, world, capsys):  # noqa: F811
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nmodel: {{id: '{world.dirs['llama']}'}}\ndata: {{source: '{world.text}'}}\n"
                    "stages: []\noutput: {dir: out}\ntarget: {params: 0.7}\nsearch: {embeddings: true}\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"llmshrink: error: {path}: search.embeddings: formats change bytes, not params; remove it (or plan for bytes)"]
