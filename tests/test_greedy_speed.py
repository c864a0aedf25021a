"""eval.latency.greedy_speed: the one decode-timing protocol of every runtime (PyTorch, llama.cpp, onnxruntime)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from llmshrink.eval.latency import greedy_speed, torch_greedy_speed

VOCAB = 11


class Chain:
    """A fake runtime whose greedy next token after t is (3t + 1) mod VOCAB; counts its calls."""

    def __init__(self):
        self.prefills, self.steps = 0, 0

    @staticmethod
    def logits(token: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor((3 * token + 1) % VOCAB), VOCAB).float()

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.prefills += 1
        return self.logits(ids[-1])

    def step(self, token: int) -> torch.Tensor:
        self.steps += 1
        return self.logits(token)


def test_greedy_speed_follows_the_argmax_and_times_each_run():
    chain = Chain()
    got = greedy_speed(chain.prefill, chain.step, [4, 2], new_tokens=5, repeats=3, warmup=2)
    assert got["tokens"] == [7, 0, 1, 4, 2]  # 3*2+1, 3*7+1=22=0, 1, 4, 13=2
    assert chain.prefills == 5 and chain.steps == 25
    assert got["prompt_tokens"] == 2 and got["new_tokens"] == 5 and got["repeats"] == 3
    assert got["prefill_ms"] > 0 and got["decode_tokens_per_s"] > 0


def test_greedy_speed_refuses_nothing_to_time():
    with pytest.raises(ValueError, match="new_tokens and repeats must be >= 1"):
        greedy_speed(Chain().prefill, Chain().step, [1], new_tokens=0)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_torch_greedy_speed_decodes_as_generate_does(build):
    model = build(layers=2, initializer_range=0.3)  # wide logits: greedy wanders instead of repeating one token
    prompt = [5, 9, 33, 2, 100, 7]
    got = torch_greedy_speed(model.train(), prompt, new_tokens=12, repeats=1, warmup=0)  # measured in eval mode
    assert model.training  # and left as found
    model.eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert got["tokens"] == want and len(set(want)) > 3
