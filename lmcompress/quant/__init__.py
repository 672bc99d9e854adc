"""Quantizers.  Each turns float weights into a QTensor; formats/ packs QTensors for disk."""

from lmcompress.quant.qtensor import QTensor, QuantConfig

__all__ = ["QTensor", "QuantConfig"]
