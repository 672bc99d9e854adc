"""Lazy, read-only access to a Hugging Face checkpoint directory.

Tensors are read from the safetensors shards on demand, one at a time, so that
quantizing a 70B model holds one decoder layer in memory, not the model.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from lmcompress.arch import ArchSpec, arch_for
from lmcompress.errors import LmcError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Checkpoint:
    """A checkpoint directory: config.json plus one or more safetensors shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._check_layout()
        self._handles: dict[str, object] = {}

    def _check_layout(self) -> None:
        if not self.path.is_dir():
            raise LmcError(f"{self.path} is not a directory; pass a Hugging Face checkpoint directory")
        if not (self.path / "config.json").is_file():
            raise LmcError(
                f"{self.path} has no config.json; pass a Hugging Face checkpoint directory "
                "(config.json and *.safetensors, as save_pretrained writes it)"
            )
        if not self.weight_map:
            raise LmcError(
                f"{self.path} has no *.safetensors weights; re-save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )

    @cached_property
    def config(self) -> dict:
        try:
            return json.loads((self.path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise LmcError(f"{self.path / 'config.json'} is not valid JSON ({exc}); restore the file") from exc

    @cached_property
    def arch(self) -> ArchSpec:
        return arch_for(self.config)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name."""
        index = self.path / INDEX_FILE
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        names: dict[str, str] = {}
        for shard in shards:
            with safe_open(self.path / shard, framework="pt") as f:
                names.update({name: shard for name in f.keys()})
        return names

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (memory-mapped, copied out on access)."""
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise LmcError(f"{self.path} has no tensor {name!r}; the checkpoint is incomplete or of another architecture") from None
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.path / shard, framework="pt")
        return self._handles[shard].get_tensor(name)

    def get_prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with prefix, keyed by the rest of the name."""
        return {name[len(prefix):]: self.get(name) for name in self.weight_map if name.startswith(prefix)}

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors of decoder layer `index`, keyed relative to the layer (e.g. 'mlp.up_proj.weight')."""
        return self.get_prefixed(self.arch.layer_prefix(index))

    def non_layer_names(self) -> list[str]:
        return [n for n in self.weight_map if not n.startswith(self.arch.layers_prefix + ".")]

    def total_bytes(self) -> int:
        return sum((self.path / shard).stat().st_size for shard in set(self.weight_map.values()))
