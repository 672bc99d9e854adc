"""lmcompress: calibrate, quantize and serve large language models.

Subpackages:
    lmcompress.quant    quantizers (RTN, AWQ, GPTQ) over one canonical QTensor
    lmcompress.formats  on-disk 4-bit layouts (AutoAWQ GEMM, GPTQ v1) and the loader
    lmcompress.calib    calibration data and layer-by-layer statistics
    lmcompress.turbo    the serving runtime
    lmcompress.cli      the `lmc` command
"""

__version__ = "0.1.0"
