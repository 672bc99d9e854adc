"""tensors_for_linear: the names and tensors the pipeline saves for one quantized linear."""

from __future__ import annotations

import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.formats import awq_gemm, gptq_v1
from lmcompress.formats.registry import tensors_for_linear

PREFIX = "model.layers.3.mlp.down_proj"


@pytest.mark.parametrize("fmt, packer, suffixes", [
    ("awq", awq_gemm.pack, ("qweight", "qzeros", "scales")),
    ("gptq", gptq_v1.pack, ("qweight", "qzeros", "scales", "g_idx")),
])
def test_names_and_tensors_per_format(qtensor, fmt, packer, suffixes):
    qt = qtensor(64, 256, 64, min_zero=1)
    tensors = tensors_for_linear(PREFIX, qt, fmt)
    assert sorted(tensors) == sorted(f"{PREFIX}.{suffix}" for suffix in suffixes)
    for suffix, tensor in packer(qt).items():
        assert torch.equal(tensors[f"{PREFIX}.{suffix}"], tensor)


def test_errors_name_the_linear_and_the_format(qtensor):
    with pytest.raises(LmcError, match="unknown output format 'exl2'; use --format awq or --format gptq"):
        tensors_for_linear(PREFIX, qtensor(64, 256, 64), "exl2")
    with pytest.raises(LmcError, match=f"{PREFIX} was quantized with act-order"):
        tensors_for_linear(PREFIX, qtensor(64, 256, 64, permuted=True), "awq")
