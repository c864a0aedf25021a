"""Iterative schedules (iterate) and layer-local distillation (local_distill) on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError, RecipeError
from llmshrink.modules.kronecker import KroneckerLinear
from llmshrink.passes import iterate, local_distill
from llmshrink.passes.kronecker import KroneckerConfig
from llmshrink.passes.kronecker import apply as kronecker_apply
from llmshrink.recipe import parse_stage
from llmshrink.specs import DataSpec

MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
KRON = {"targets": MLP, "a_shape": [8, 8], "rank": 1, "permute": False}


def deep_llama(layers: int = 4, seed: int = 0):
    return tiny_llama(seed, layers=layers, intermediate_size=128, tie_word_embeddings=False)


def make_ctx(model, tiny_text, evaluate=None) -> Context:
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    ctx = Context(tokenizer=tiny_tokenizer(), teacher=teacher, data=DataSpec(source=str(tiny_text)),
                  log=lambda _: None)
    ctx.evaluate = evaluate
    return ctx


def kron_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, KroneckerLinear)]


def test_iterate_walks_groups_in_order_and_equals_the_stages_written_out(tiny_text):
    stages = [{"kronecker": KRON}, {"distill": {"steps": 2, "batch_size": 2, "seq_len": 16, "warmup_steps": 0}}]
    model = deep_llama()
    evals = []
    ctx = make_ctx(model, tiny_text, evaluate=lambda m: evals.append(len(kron_layers(m))) or float(len(evals)))
    cfg = iterate.IterateConfig(stages=stages, groups=[[0, 1], [3]])
    record = iterate.apply(model, cfg, ctx)
    assert record["groups"] == [[0, 1], [3]]
    assert [[s["pass"] for s in run["stages"]] for run in record["runs"]] == [["kronecker", "distill"]] * 2
    assert [layer["name"] for layer in record["runs"][1]["stages"][0]["record"]["layers"]] == [
        f"model.layers.3.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert evals == [6, 9]  # perplexity hook after each group: 2 blocks, then 3 blocks compressed
    assert [run["perplexity"] for run in record["runs"]] == [1.0, 2.0]
    assert len(kron_layers(model)) == 9 and "model.layers.2.mlp.up_proj" not in kron_layers(model)

    # The same stages written out by hand give the same weights.
    by_hand = deep_llama()
    hand_ctx = make_ctx(by_hand, tiny_text)
    from llmshrink.passes import distill

    for group in ([0, 1], [3]):
        kronecker_apply(by_hand, KroneckerConfig(layers=group, **KRON), hand_ctx)
        distill.apply(by_hand, distill.DistillConfig(**stages[1]["distill"]), hand_ctx)
    for (name, a), (_, b) in zip(model.state_dict().items(), by_hand.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_iterate_group_size_covers_every_block():
    model = deep_llama(layers=5)
    cfg = iterate.IterateConfig(stages=[{"kronecker": KRON}], group_size=2)
    assert iterate.block_groups(model, cfg) == [[0, 1], [2, 3], [4]]
    cfg = iterate.IterateConfig(stages=[{"kronecker": KRON}], layers=[4, 1])
    assert iterate.block_groups(model, cfg) == [[4], [1]]
    with pytest.raises(LlmshrinkError, match=r"^iterate: blocks \[7\] do not exist; the model has blocks 0\.\.4$"):
        iterate.block_groups(model, iterate.IterateConfig(stages=[{"kronecker": KRON}], groups=[[0], [7]]))


def test_iterate_recipe_errors_name_the_nested_field():
    def parse(body):
        return parse_stage({"iterate": body}, "r.yaml", "stages[1]")

    with pytest.raises(RecipeError) as err:
        parse({"stages": [{"kronecker": {**KRON, "rank": 0}}]})
    assert str(err.value) == ("r.yaml: stages[1].iterate.stages[0].kronecker.rank: "
                              "input should be greater than or equal to 1, got 0")
    with pytest.raises(RecipeError) as err:
        parse({"stages": [{"kronecker": {**KRON, "layers": [0]}}]})
    assert str(err.value) == ("r.yaml: stages[1].iterate.stages[0].kronecker.layers: set by iterate for each "
                              "group; remove it (give iterate `groups` or `layers`)")
    with pytest.raises(RecipeError, match=r"stages\[1\]\.iterate\.stages: no inner stage takes `layers`"):
        parse({"stages": [{"distill": {"steps": 1}}]})
    with pytest.raises(RecipeError, match=r"stages\[1\]\.iterate\.stages\[0\]: unknown pass 'kroneker'; did you mean"):
        parse({"stages": [{"kroneker": {}}]})
    with pytest.raises(RecipeError, match=r"give either `groups`, or `layers`/`group_size`, not both"):
        parse({"stages": [{"kronecker": KRON}], "groups": [[0]], "group_size": 2})


def test_local_distill_fits_compressed_layers_to_teacher_outputs(tiny_text):
    # MLP weights that are exact Kronecker products, so a perfect fit exists; the student starts
    # from it with its factors knocked off by noise, and must find its way back.
    model = deep_llama(layers=2)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(("gate_proj", "up_proj", "down_proj")):
                m.weight.copy_(torch.kron(torch.randn(8, 8), torch.randn(m.out_features // 8, m.in_features // 8)))
    ctx = make_ctx(model, tiny_text)
    kronecker_apply(model, KroneckerConfig(**KRON), ctx)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 3:  # Kronecker factors (rank, m, n)
                p.add_(0.3 * p.std() * torch.randn_like(p))
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if "mlp" not in n}
    cfg = local_distill.LocalDistillConfig(steps=40, batch_size=2, seq_len=32, lr=3e-2, warmup_steps=0)
    record = local_distill.apply(model, cfg, ctx)
    assert record["layers"] == kron_layers(model) and len(record["layers"]) == 6
    assert record["first_loss"] > 0.05 and record["last_loss"] < 0.2 * record["first_loss"]
    assert record["tokens"] == 40 * 2 * 32 and record["curve"]["tokens"][-1] == record["tokens"]
    for name, before in frozen_before.items():  # only the compressed layers train
        assert torch.equal(before, dict(model.named_parameters())[name]), name
    assert all(p.requires_grad for p in model.parameters())  # flags restored

    # The loss is the layers' mean normalised output error, measured on the teacher's inputs.
    ids = torch.randint(2, 60, (2, 32))
    names = record["layers"]
    fn = local_distill.local_loss([ctx.teacher.get_submodule(n) for n in names])
    student = local_distill.LocalStudent(names, [model.get_submodule(n) for n in names])
    loss, parts = fn(student, ctx.teacher, ids)
    seen = {}
    hooks = [ctx.teacher.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.update({n: (a[0], o)}))
             for n in names]
    with torch.no_grad():
        ctx.teacher(input_ids=ids)
        for h in hooks:
            h.remove()
        terms = torch.stack([(model.get_submodule(n)(x) - y).pow(2).mean() / y.pow(2).mean()
                             for n, (x, y) in seen.items()])
    assert torch.allclose(loss.detach(), terms.mean(), rtol=1e-5)
    assert torch.allclose(parts["worst"], terms.max(), rtol=1e-5)


def test_local_distill_errors(tiny_text):
    model = deep_llama(layers=2)
    ctx = make_ctx(model, tiny_text)
    cfg = local_distill.LocalDistillConfig(steps=1)
    with pytest.raises(LlmshrinkError, match=r"^local_distill: no compressed layer matches targets '\.\*': put a"):
        local_distill.apply(model, cfg, ctx)
    kronecker_apply(model, KroneckerConfig(**KRON), ctx)
    with pytest.raises(LlmshrinkError, match=r"in layers \[5\]"):
        local_distill.apply(model, cfg.model_copy(update={"layers": [5]}), ctx)
    ctx.teacher = deep_llama(layers=1)
    with pytest.raises(LlmshrinkError, match=r"^local_distill: the teacher has no dense layer model\.layers\.1\.mlp"):
        local_distill.apply(model, cfg, ctx)


def test_local_distill_leaves_compressed_embedding_tables_alone(tiny_text):
    # A factorised table replaced a lookup, not a dense layer: local_distill fits the Linear layers only.
    from llmshrink.passes.low_rank import LowRankConfig
    from llmshrink.passes.low_rank import apply as low_rank_apply

    model = deep_llama(layers=2)  # (untied)
    ctx = make_ctx(model, tiny_text)
    low_rank_apply(model, LowRankConfig(targets=r".*mlp\.up_proj", embeddings=True, rank=4), ctx)
    table = type(model.get_submodule("model.embed_tokens")).__name__
    before = {n: p.clone() for n, p in model.model.embed_tokens.named_parameters()}
    record = local_distill.apply(model, local_distill.LocalDistillConfig(steps=2, batch_size=2, seq_len=16), ctx)
    assert table == "LowRankEmbedding"
    assert record["layers"] == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert all(torch.equal(p, before[n]) for n, p in model.model.embed_tokens.named_parameters())
