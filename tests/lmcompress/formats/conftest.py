"""Random QTensors and tiny Llama checkpoints for the format tests."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from transformers import LlamaConfig

from lmcompress.quant.qtensor import QTensor

# Every linear of this model has out_features divisible by 64, which AutoAWQ's clip search requires.
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_llama_config(num_layers: int = 2, tie: bool = False) -> LlamaConfig:
    return LlamaConfig(**TINY_LLAMA, num_hidden_layers=num_layers, tie_word_embeddings=tie)


def make_qtensor(
    out_features: int,
    in_features: int,
    group_size: int,
    sym: bool = False,
    permuted: bool = False,
    min_zero: int = 0,
    seed: int = 0,
) -> QTensor:
    """A random 4-bit QTensor whose codes cover 0..15 and whose scales are exact in fp16."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = in_features // group_size
    q = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    q.view(-1)[:16] = torch.arange(16, dtype=torch.uint8)  # every code present, whatever the seed
    if sym:
        zeros = torch.full((out_features, n_groups), 8, dtype=torch.uint8)
    else:
        zeros = torch.randint(min_zero, 16, (out_features, n_groups), generator=gen, dtype=torch.uint8)
        zeros.view(-1)[: 16 - min_zero] = torch.arange(min_zero, 16, dtype=torch.uint8)
    scales = (torch.rand(out_features, n_groups, generator=gen) * 0.05 + 1e-3).half().float()
    g_idx = None
    if permuted:
        order = torch.randperm(in_features, generator=gen)
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[order] = (torch.arange(in_features) // group_size).to(torch.int32)
    return QTensor(q=q, scales=scales, zeros=zeros, bits=4, group_size=group_size, g_idx=g_idx)


def assert_same_qtensor(actual: QTensor, expected: QTensor) -> None:
    assert actual.shape == expected.shape
    assert actual.group_size == expected.group_size and actual.bits == expected.bits
    assert torch.equal(actual.q, expected.q)
    assert torch.equal(actual.zeros, expected.zeros)
    assert torch.equal(actual.scales.float(), expected.scales.float())
    assert torch.equal(actual.group_index(), expected.group_index())


@pytest.fixture
def qtensor() -> Callable[..., QTensor]:
    """Factory: qtensor(out, in, group_size, sym=False, permuted=False, min_zero=0, seed=0)."""
    return make_qtensor


@pytest.fixture
def assert_same() -> Callable[[QTensor, QTensor], None]:
    """assert_same(actual, expected): equal codes, zeros, scales and grouping."""
    return assert_same_qtensor


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[..., LlamaConfig]:
    """Factory: tiny_llama(num_layers=2, tie=False) -> LlamaConfig of a 128-wide Llama."""
    return tiny_llama_config
