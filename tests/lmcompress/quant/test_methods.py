import pytest

from lmcompress.errors import LmcError
from lmcompress.quant.awq import awq_quantize_layer
from lmcompress.quant.gptq import gptq_quantize_layer
from lmcompress.quant.methods import METHODS, method_named
from lmcompress.quant.rtn import rtn_quantize_layer


def test_methods_by_name():
    assert METHODS == {"awq": awq_quantize_layer, "gptq": gptq_quantize_layer, "rtn": rtn_quantize_layer}
    assert method_named("gptq") is gptq_quantize_layer


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(LmcError, match=r"unknown quantization method 'smoothquant'; use --method awq, gptq, rtn"):
        method_named("smoothquant")
