"""Dummy-weight checkpoints of real model shapes (e.g. Llama-2-7B), for GPU timing runs.

Weights are written tensor by tensor straight into safetensors shards, so a 7B
checkpoint needs one shard of memory, not the model.  Values are N(0, 0.02) with
norms at 1, which exercises every code path; the accuracy of such a model means
nothing, so config.json says so: DUMMY_WEIGHTS_KEY ("lmc_dummy_weights": true).
The key rides along wherever config.json is carried over (lmc quantize copies the
source's config; transformers' save_pretrained keeps unknown config keys), and
`lmc report` marks the accuracy columns of such a model not applicable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmcompress.output_dir import ShardedSafetensorsWriter, atomic_output_dir

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}
SHAPES = {"llama2-7b": LLAMA2_7B}
DUMMY_WEIGHTS_KEY = "lmc_dummy_weights"


def has_dummy_weights(model_dir: str | Path) -> bool:
    """Whether config.json marks the weights as random (written here, or quantized from such a checkpoint)."""
    config_path = Path(model_dir) / "config.json"
    return config_path.is_file() and json.loads(config_path.read_text()).get(DUMMY_WEIGHTS_KEY) is True


def write_dummy_checkpoint(out_dir: str | Path, config: dict, tokenizer_dir: str | Path | None = None,
                           device: str = "cpu", seed: int = 0, max_shard_bytes: int = 4 * 1024**3) -> Path:
    """Write config.json (marked DUMMY_WEIGHTS_KEY), fp16 random weights and (optionally) a tokenizer's files."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps({**config, DUMMY_WEIGHTS_KEY: True}, indent=2))
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        for name, shape in _parameter_shapes(tmp).items():
            writer.add(name, _dummy_tensor(name, shape, device, generator))
        writer.close()
        if tokenizer_dir is not None:
            for path in Path(tokenizer_dir).glob("tokenizer*"):
                shutil.copy2(path, tmp / path.name)
    return Path(out_dir)


def _parameter_shapes(config_dir: Path) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def _dummy_tensor(name: str, shape: tuple[int, ...], device: str, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    values = torch.randn(shape, device=device, generator=generator, dtype=torch.float32) * 0.02
    return values.to(torch.float16).cpu()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a dummy-weight checkpoint of a real model's shape.")
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", help="directory whose tokenizer files to copy (e.g. tests/assets/ref-llama)")
    parser.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda is much faster)")
    args = parser.parse_args()
    write_dummy_checkpoint(args.out_dir, SHAPES[args.shape], args.tokenizer, device=args.device)


if __name__ == "__main__":
    main()
