"""What a report row needs to be reproduced: package versions, the device, exact commands, fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    """Versions of the packages that change the numbers, and the device they ran on."""
    import transformers

    from lmcompress import __version__
    from lmcompress.report.bnb import bnb_version

    return {
        "python": platform.python_version(),
        "lmcompress": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb_version(),
        "device": str(device),
        "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def command(*args: object) -> str:
    """A shell-quoted command line; None arguments and the option before them are left out."""
    words: list[str] = []
    for arg in args:
        if arg is None:
            if words and words[-1].startswith("--"):
                words.pop()
            continue
        words.append(str(arg))
    return shlex.join(words)


def fingerprint(settings: dict) -> str:
    """A short stable hash of JSON-able settings: a cell is reused only under the same fingerprint."""
    canonical = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def checkpoint_identity(model_dir: str | Path) -> dict:
    """config.json's hash and each weight file's size and modification time: changes when the model does."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files} | {
        "config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
    }


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
