"""The project's small reference model, which tests and the demo use in place of a 7B checkpoint.

    from lmcompress.reference import REFERENCE_MODEL_DIR, REFERENCE_HELDOUT, REFERENCE_CALIB

REFERENCE_MODEL_DIR  tests/assets/ref-llama: a 19M-parameter Llama (fp16 safetensors
                     shards, byte-level BPE tokenizer with a ChatML template)
REFERENCE_HELDOUT    tests/assets/ref-corpus/heldout.txt: held-out documents, never trained on
REFERENCE_CALIB      tests/assets/ref-corpus/calib.txt: a sample of training documents

The files live in the source tree, not in the installed package, so the names
resolve (and are checked) on first use; docs/reference-model.md says how they
were made.
"""

from __future__ import annotations

from pathlib import Path

from lmcompress.errors import LmcError

_ASSETS = Path(__file__).resolve().parents[2] / "tests" / "assets"
_PATHS = {
    "REFERENCE_MODEL_DIR": _ASSETS / "ref-llama" / "config.json",
    "REFERENCE_HELDOUT": _ASSETS / "ref-corpus" / "heldout.txt",
    "REFERENCE_CALIB": _ASSETS / "ref-corpus" / "calib.txt",
}

__all__ = list(_PATHS)


def __getattr__(name: str) -> Path:
    """Module attribute lookup (PEP 562): each name resolves to its checked path."""
    if name not in _PATHS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    marker = _PATHS[name]
    if not marker.is_file():
        raise LmcError(
            f"reference asset {marker} is missing; use a git checkout of lmcompress installed with "
            "`pip install -e .` (the assets are not part of a wheel)"
        )
    return marker.parent if name == "REFERENCE_MODEL_DIR" else marker
