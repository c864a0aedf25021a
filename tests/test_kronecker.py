"""KroneckerLinear, the permutation search and the factor-shape choice."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmshrink.decompose.factor_shapes import (
    choose_factor_shapes,
    factor_shape_candidates,
    kronecker_macs,
    kronecker_params,
    validate_factor_shapes,
)
from llmshrink.decompose.kronecker_search import relative_kronecker_error, search_permutations
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.kronecker import KroneckerLinear, kronecker_sum, nearest_kronecker


def _factors(a_shape, b_shape, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, *a_shape, generator=gen), torch.randn(rank, *b_shape, generator=gen)


def _permuted_product(a_shape, b_shape, seed, rank=1, noise=0.0):
    """W with W[rows][:, cols] = Σ A_t ⊗ B_t (+ noise), for seeded random factors and orders."""
    a, b = _factors(a_shape, b_shape, rank, seed)
    k = kronecker_sum(a, b)
    gen = torch.Generator().manual_seed(seed + 1000)
    k = k + noise * k.std() * torch.randn(k.shape, generator=gen)
    rows, cols = torch.randperm(k.shape[0], generator=gen), torch.randperm(k.shape[1], generator=gen)
    w = torch.empty_like(k)
    w[rows[:, None], cols[None, :]] = k
    return w, rows, cols


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach(), y.detach()
    return float((x - y).norm() / y.norm())


# --- KroneckerLinear -----------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("permuted", [False, True])
# (6,2)⊗(3,8) multiplies the input side first, (2,6)⊗(8,3) the other way.
@pytest.mark.parametrize(("a_shape", "b_shape", "input_first"), [((6, 2), (3, 8), True), ((2, 6), (8, 3), False)])
def test_forward_equals_dense(rank, permuted, a_shape, b_shape, input_first):
    torch.manual_seed(0)
    out_f, in_f = a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]
    layer = KroneckerLinear(in_f, out_f, a_shape, b_shape, rank, bias=True, permuted=permuted)
    assert layer._input_side_first is input_first
    with torch.no_grad():
        layer.bias.normal_()
        if permuted:
            layer.in_index.copy_(torch.randperm(in_f))
            layer.out_index.copy_(torch.randperm(out_f))
    dense = layer.to_dense()
    for x in (torch.randn(5, in_f), torch.randn(2, 7, in_f)):
        torch.testing.assert_close(layer(x), x @ dense.T + layer.bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("permute", [False, True])
def test_from_linear_reproduces_exact_kronecker_layer(kind, permute):
    torch.manual_seed(1)
    a_shape, b_shape, rank = (4, 3), (5, 6), 2
    a, b = _factors(a_shape, b_shape, rank, seed=1)
    k = kronecker_sum(a, b)
    rows, cols = (torch.randperm(20), torch.randperm(18)) if permute else (torch.arange(20), torch.arange(18))
    weight = torch.empty_like(k)
    weight[rows[:, None], cols[None, :]] = k  # so that weight[rows][:, cols] = k
    if kind == "linear":
        dense = nn.Linear(18, 20)
        dense.weight.data.copy_(weight)
    else:
        dense = Conv1D(20, 18)  # stores the weight as in x out
        dense.weight.data.copy_(weight.T)
    dense.bias.data.normal_()
    layer = KroneckerLinear.from_linear(
        dense, a_shape, b_shape, rank, row_perm=rows if permute else None, col_perm=cols if permute else None
    )
    x = torch.randn(3, 4, 18)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-4, rtol=1e-4)
    assert _rel(layer.to_dense(), weight) < 1e-5


@pytest.mark.parametrize("rank", [1, 3])
def test_nearest_kronecker_recovers_exact_sum(rank):
    a, b = _factors((6, 4), (5, 7), rank, seed=2)
    w = kronecker_sum(a, b)
    fa, fb = nearest_kronecker(w, (6, 4), (5, 7), rank)
    assert _rel(kronecker_sum(fa, fb), w) < 1e-5
    assert relative_kronecker_error(w, (6, 4), (5, 7), rank) < 1e-5


# --- permutation search --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "seed"),
    [
        ((4, 5), (6, 4), 0),
        ((4, 5), (6, 4), 1),
        ((4, 5), (6, 4), 2),
        ((8, 6), (8, 8), 3),
        ((8, 6), (8, 8), 4),
        ((4, 4), (4, 4), 5),  # equal group sizes: which grouping belongs to A is ambiguous
        ((16, 12), (24, 16), 6),  # 384x192: the float32 path with the randomised fit
    ],
)
def test_search_recovers_permuted_product(a_shape, b_shape, seed):
    torch.manual_seed(seed)
    w, _, _ = _permuted_product(a_shape, b_shape, seed)
    found = search_permutations(w, a_shape, b_shape, seed=seed)
    assert found.error_identity > 0.3
    assert found.error < 1e-4
    assert torch.equal(found.row_perm.sort().values, torch.arange(w.shape[0]))
    assert torch.equal(found.col_perm.sort().values, torch.arange(w.shape[1]))
    # The convention of from_linear: the layer built with these orders reproduces W.
    dense = nn.Linear(w.shape[1], w.shape[0], bias=False)
    dense.weight.data.copy_(w)
    layer = KroneckerLinear.from_linear(dense, a_shape, b_shape, row_perm=found.row_perm, col_perm=found.col_perm)
    assert _rel(layer.to_dense(), w) < 1e-4


def test_search_rank_above_one_recovers_permuted_product():
    torch.manual_seed(7)
    w, _, _ = _permuted_product((6, 4), (8, 6), seed=7)
    found = search_permutations(w, (6, 4), (8, 6), rank=2)
    assert found.error_identity > 0.3
    assert found.error < 1e-4


def test_search_is_robust_to_noise():
    torch.manual_seed(8)
    w, rows, cols = _permuted_product((8, 6), (8, 8), seed=8, noise=0.05)
    truth = relative_kronecker_error(w[rows][:, cols], (8, 6), (8, 8))
    found = search_permutations(w, (8, 6), (8, 8))
    assert found.error_identity > 0.5
    assert found.error < 1.05 * truth


def test_search_leaves_rows_alone_when_a_has_one_row():
    torch.manual_seed(9)
    w, _, _ = _permuted_product((1, 5), (6, 4), seed=9)  # every row order fits equally well
    found = search_permutations(w, (1, 5), (6, 4))
    assert torch.equal(found.row_perm, torch.arange(6))
    assert found.error_identity > 0.3
    assert found.error < 1e-4


@pytest.mark.parametrize("rank", [1, 2])
def test_search_on_gaussian_is_monotone_and_beats_identity(rank):
    torch.manual_seed(10)
    w = torch.randn(48, 40)
    calls = []
    found = search_permutations(w, (6, 5), (8, 8), rank, progress=lambda *args: calls.append(args))
    assert found.error < found.error_identity - 0.02
    assert all(later <= earlier for earlier, later in zip(found.history, found.history[1:], strict=False))
    # The reported error is the one the chosen orders give (the history tracks a faster fit).
    actual = relative_kronecker_error(w[found.row_perm][:, found.col_perm], (6, 5), (8, 8), rank)
    assert found.error == pytest.approx(actual, abs=1e-6)
    assert found.error <= found.history[-1] + 1e-6
    assert calls and all(done <= total for done, total, _ in calls)
    assert calls[-1][2] == pytest.approx(found.history[-1])


# --- factor shapes -------------------------------------------------------------------------------


def test_candidates_tile_and_exclude_trivial_factors():
    candidates = factor_shape_candidates(12, 8)
    assert all(m1 * m2 == 12 and n1 * n2 == 8 for (m1, n1), (m2, n2) in candidates)
    assert ((3, 2), (4, 4)) in candidates
    assert ((2, 1), (6, 8)) in candidates
    for trivial in [((1, 1), (12, 8)), ((12, 8), (1, 1)), ((12, 1), (1, 8)), ((1, 8), (12, 1))]:
        assert trivial not in candidates  # no compression, or just a rank-r matrix
    assert len(candidates) == len(set(candidates))
    assert factor_shape_candidates(7, 13) == []


def test_params_and_macs():
    assert kronecker_params((4, 5), (6, 4), 3) == 3 * (20 + 24)
    # (6,2)⊗(3,8): input side first, 16·3 + 6·2·3 = 84 per term
    assert kronecker_macs((6, 2), (3, 8), 2) == 2 * 84


@pytest.mark.parametrize(("ratio", "rank"), [(0.1, None), (0.25, None), (0.1, 1), (0.3, 2)])
def test_choice_fits_budget_and_reports_true_error(ratio, rank):
    torch.manual_seed(11)
    weight = torch.randn(96, 72)
    choice = choose_factor_shapes(weight, ratio, rank=rank, max_rank=4)
    assert choice.params == kronecker_params(choice.a_shape, choice.b_shape, choice.rank) <= ratio * 96 * 72
    assert kronecker_macs(choice.a_shape, choice.b_shape, choice.rank) < 96 * 72
    if rank is None:
        assert 1 <= choice.rank <= 4
        bigger = choice.rank + 1
        assert bigger > 4 or kronecker_params(choice.a_shape, choice.b_shape, bigger) > ratio * 96 * 72 or (
            kronecker_macs(choice.a_shape, choice.b_shape, bigger) >= 96 * 72
        )
    else:
        assert choice.rank == rank
    dense = nn.Linear(72, 96, bias=False)
    dense.weight.data.copy_(weight)
    layer = KroneckerLinear.from_linear(dense, choice.a_shape, choice.b_shape, choice.rank)
    assert choice.rel_error == pytest.approx(_rel(layer.to_dense(), weight), abs=1e-5)


def test_choice_finds_the_exact_structure():
    a, b = _factors((4, 6), (6, 8), 1, seed=12)
    weight = kronecker_sum(a, b)  # 24x48
    choice = choose_factor_shapes(weight, 0.1, rank=1)
    assert choice.rel_error < 1e-5
    assert choice.params <= 0.1 * 24 * 48


def test_prime_layer_error_message():
    with pytest.raises(LlmshrinkError) as err:
        choose_factor_shapes(torch.randn(7, 13), 0.5)
    assert str(err.value) == (
        "layer 7x13: no Kronecker factorisation (both factors larger than 1x1) exists: 7 and 13 are prime"
    )


def test_ratio_too_small_names_the_smallest_that_works():
    weight = torch.randn(24, 20)
    with pytest.raises(LlmshrinkError) as err:
        choose_factor_shapes(weight, 0.001, rank=1)
    message = str(err.value)
    assert "\n" not in message
    found = re.fullmatch(
        r"layer 24x20: ratio 0\.001 too small; smallest possible is ([0-9.]+) with "
        r"A=(\d+)x(\d+), B=(\d+)x(\d+) at rank 1",
        message,
    )
    assert found, message
    smallest, m1, n1, m2, n2 = float(found[1]), *map(int, found.groups()[1:])
    assert m1 * m2 == 24 and n1 * n2 == 20
    choice = choose_factor_shapes(weight, smallest * 1.001, rank=1)  # the suggestion works
    assert choice.params <= smallest * 1.001 * 24 * 20


def test_validate_factor_shapes():
    validate_factor_shapes(1536, 576, (48, 24), (32, 24))
    with pytest.raises(LlmshrinkError) as err:
        validate_factor_shapes(1536, 576, (5, 4), (307, 144))
    message = str(err.value)
    assert message.startswith("layer 1536x576: factor shapes A=5x4, B=307x144 give a 1535x576 weight")
    listed = re.findall(r"(\d+)x(\d+)", message.split("valid A shapes include")[1])
    assert listed and all(1536 % int(m) == 0 and 576 % int(n) == 0 for m, n in listed)
    with pytest.raises(LlmshrinkError, match="are prime"):
        validate_factor_shapes(7, 13, (2, 1), (3, 13))


def test_nearest_kronecker_pads_rank_beyond_rearrangement():
    a, b = _factors((2, 2), (2, 3), 4, seed=13)
    w = kronecker_sum(a, b)  # the rearrangement is 4x6: at most 4 terms
    fa, fb = nearest_kronecker(w, (2, 2), (2, 3), rank=6)
    assert fa.shape == (6, 2, 2) and fb.shape == (6, 2, 3)
    assert _rel(kronecker_sum(fa, fb), w) < 1e-5
