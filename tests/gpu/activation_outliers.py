"""How salient a model's activation channels are: for each decoder linear's input, the per-channel mean |x| that
AWQ scales by (x_mean), as max / median and the second largest / median, over calibration samples; and the
kurtosis of the channels' RMS, m4 / m2^2 over the channels (He et al. 2024's outlier-feature measure: 1 when
every channel has the same RMS, 3 when the RMSs spread like |N(0, 1)|, far more when a few channels dominate).

    python3 tests/gpu/activation_outliers.py [MODEL] [--calib PATH] [--samples 16] [--device cpu]

AWQ protects the few input channels with large x_mean; where no channel stands out its scales stay near 1
and little is left for it to gain over RTN (docs/quantization.md).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmcompress.calib.data import load_calibration_samples

LINEARS = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj", "down": "mlp.down_proj"}


def channel_stats(model, ids: torch.Tensor) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, linear) -> ([in_features] mean |x|, [in_features] RMS of x) of that linear's input over every
    token of ids [n, seq]."""
    stats = {}

    def record(key):
        def hook(_module, args):
            x = args[0].flatten(0, -2).float()  # [tokens, in_features]
            stats[key] = (x.abs().mean(0).cpu(), x.pow(2).mean(0).sqrt().cpu())
        return hook

    hooks = [layer.get_submodule(path).register_forward_pre_hook(record((index, name)))
             for index, layer in enumerate(model.model.layers) for name, path in LINEARS.items()]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="tests/assets/ref-llama")
    parser.add_argument("--calib", default="tests/assets/ref-corpus/calib.txt")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    ids = load_calibration_samples(args.calib, AutoTokenizer.from_pretrained(args.model), n_samples=args.samples,
                                   seq_len=min(512, model.config.max_position_embeddings))
    print(f"{'layer':>5} {'linear':>8} {'max/median':>10} {'2nd/median':>10} {'kurtosis':>8}")
    for (index, name), (mean, rms) in channel_stats(model, ids.to(args.device)).items():
        top, median = mean.topk(2).values, mean.median()
        kurtosis = rms.pow(4).mean() / rms.pow(2).mean().pow(2)
        print(f"{index:5d} {name:>8} {top[0] / median:10.1f} {top[1] / median:10.1f} {kurtosis:8.2f}")


if __name__ == "__main__":
    main()
