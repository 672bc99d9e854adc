import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.quant.qtensor import QTensor, concat_out_features


def random_qtensor(out: int, inp: int, group: int = 32, seed: int = 0, g_idx: torch.Tensor | None = None) -> QTensor:
    gen = torch.Generator().manual_seed(seed)
    return QTensor(
        q=torch.randint(0, 16, (out, inp), generator=gen, dtype=torch.uint8),
        scales=torch.rand(out, inp // group, generator=gen) + 0.1,
        zeros=torch.randint(0, 16, (out, inp // group), generator=gen, dtype=torch.uint8),
        bits=4, group_size=group, g_idx=g_idx,
    )


def test_stacked_weight_dequantizes_to_the_stacked_parts():
    parts = [random_qtensor(8, 64, seed=1), random_qtensor(4, 64, seed=2), random_qtensor(4, 64, seed=3)]
    stacked = concat_out_features(parts)
    assert stacked.shape == (16, 64)
    torch.testing.assert_close(stacked.dequantize(), torch.cat([p.dequantize() for p in parts]), rtol=0, atol=0)


def test_stacking_keeps_a_shared_act_order_grouping():
    g_idx = (torch.randperm(64, generator=torch.Generator().manual_seed(0)) // 32).int()
    parts = [random_qtensor(4, 64, seed=s, g_idx=g_idx) for s in (1, 2)]
    stacked = concat_out_features(parts)
    torch.testing.assert_close(stacked.dequantize(), torch.cat([p.dequantize() for p in parts]), rtol=0, atol=0)


def test_parts_with_different_grouping_are_refused():
    g_idx = (torch.arange(64).flip(0) // 32).int()
    with pytest.raises(LmcError, match="separate linears"):
        concat_out_features([random_qtensor(4, 64), random_qtensor(4, 64, g_idx=g_idx)])
    with pytest.raises(LmcError, match="separate linears"):
        concat_out_features([random_qtensor(4, 64), random_qtensor(4, 64, group=64)])
