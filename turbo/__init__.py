"""lmcompress.turbo: the serving runtime (paged KV cache, continuous batching, quantized KV).

    from lmcompress.turbo import LLM, SamplingParams
    outputs = LLM("path/to/model").generate(["Hello"], SamplingParams(max_tokens=16))

The names below are imported on first use (PEP 562), so importing a light module
such as lmcompress.turbo.scheduler does not load transformers.
"""

import importlib

_EXPORTS = {
    "LLM": "lmcompress.turbo.llm",
    "SamplingParams": "lmcompress.turbo.sampling_params",
    "EngineConfig": "lmcompress.turbo.config",
    "AsyncEngine": "lmcompress.turbo.async_engine",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
