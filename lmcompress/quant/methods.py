"""The quantization methods by name, as the CLI's --method selects them."""

from __future__ import annotations

from lmcompress.errors import LmcError
from lmcompress.quant.awq import awq_quantize_layer
from lmcompress.quant.gptq import gptq_quantize_layer
from lmcompress.quant.layer import QuantMethod
from lmcompress.quant.rtn import rtn_quantize_layer

METHODS: dict[str, QuantMethod] = {
    "awq": awq_quantize_layer,
    "gptq": gptq_quantize_layer,
    "rtn": rtn_quantize_layer,
}


def method_named(name: str) -> QuantMethod:
    """The method registered as `name`, or an LmcError listing the valid names."""
    if name not in METHODS:
        raise LmcError(f"unknown quantization method {name!r}; use --method " + ", ".join(sorted(METHODS)))
    return METHODS[name]
