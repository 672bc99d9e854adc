"""Train the reference Llama on the reference corpus, then check that it is quantization-sensitive.

The corpus (~10.5M tokens) is small next to what a GPU can process in minutes, so
the limit is over-fitting, not compute.  Instead of guessing the best number of
epochs, one call trains a few candidates, each with its own full warmup + cosine
schedule over a different number of epochs (sharing the time budget in proportion),
keeps each candidate's best-validation weights (early-stopping when validation stops
improving), and saves the candidate with the lowest validation loss among those whose
held-out perplexity rises by at least --min-w4-increase under RTN W4 g128.

    python -m lmcompress.reference.train --data corpus/ --tokenizer tests/assets/ref-llama \\
        --heldout tests/assets/ref-corpus/heldout.txt --out out/ --epochs 4 12 30 --max-seconds 440

writes out/ref-llama/ (fp16 safetensors shards + config) and out/metrics.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from lmcompress.reference.corpus import read_documents
from lmcompress.reference.evaluate import fake_quantize_decoder_linears, perplexity, token_stream
from lmcompress.reference.tokenizer import EOS, IM_END

MAX_SHARD_SIZE = "15MB"  # files that come back from the GPU machine must stay under 16 MiB
SLICE_WINDOWS = 4  # the held-out slice that the CPU test re-measures (4 windows of seq_len tokens)


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 384
    num_hidden_layers: int = 8
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    intermediate_size: int = 1024
    max_position_embeddings: int = 1024


SHAPES = {
    "reference": ModelShape(),
    # For dry runs of this script on a CPU; in_features stay multiples of 128 for g128 RTN.
    "tiny": ModelShape(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       intermediate_size=256),
    # For comparing training recipes on a CPU (docs/quantization.md), where the reference shape trains for hours.
    "small": ModelShape(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=768, max_position_embeddings=256),
}


@dataclass(frozen=True)
class TrainConfig:
    epochs: float
    max_seconds: float
    # The shape's max_position_embeddings: every position gets trained, because `lmc eval ppl`
    # uses windows as long as the model allows.
    seq_len: int = 1024
    batch_size: int = 64
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    bos_fraction: float = 0.5  # share of windows that start with <s> (prompts do; eval windows mostly don't)
    evals_per_run: int = 40
    patience: int = 10  # evaluations without a new best before stopping
    seed: int = 0


@dataclass
class RunResult:
    epochs: float
    steps: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    best_valid_loss: float = math.inf
    best_step: int = 0
    stopped_early: bool = False
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train loss, valid loss)


def model_config(shape: ModelShape, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        **asdict(shape),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over steps, then cosine from 1 to min_lr_ratio over progress in [0, 1]."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return warmup * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (linears, embeddings), none on norm weights."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), eps=cfg.adam_eps, fused=device.type == "cuda")


def sample_batch(stream: torch.Tensor, cfg: TrainConfig, bos_id: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq_len] random windows of the training stream; some get <s> in place of their first token.

    Sampled where the stream lives (on the GPU), so no step waits on a host-to-device copy.
    """
    device = stream.device
    starts = torch.randint(0, stream.numel() - cfg.seq_len, (cfg.batch_size,), generator=gen, device=device)
    batch = stream[starts[:, None] + torch.arange(cfg.seq_len, device=device)]
    with_bos = torch.rand(cfg.batch_size, generator=gen, device=device) < cfg.bos_fraction
    batch[with_bos, 0] = bos_id
    return batch


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def valid_loss(model, windows: torch.Tensor, device: torch.device, batch_size: int = 64) -> float:
    """Mean next-token loss over [n, seq_len] windows (bf16 autocast, like training)."""
    model.eval()
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        with autocast(device):
            logits = model(input_ids=batch).logits
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def train_one(config: LlamaConfig, stream: torch.Tensor, valid: torch.Tensor, cfg: TrainConfig,
              device: torch.device, bos_id: int) -> tuple[dict[str, torch.Tensor], RunResult]:
    """Train one candidate; return its best-validation state dict (on CPU) and its record."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=stream.device).manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).to(device)
    optimizer = make_optimizer(model, cfg, device)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps = max(1, round(cfg.epochs * stream.numel() / tokens_per_step))
    eval_every = max(1, total_steps // cfg.evals_per_run)
    result = RunResult(epochs=cfg.epochs)
    best_state: dict[str, torch.Tensor] = {}
    evals_since_best = 0
    start = time.perf_counter()
    for step in range(total_steps):
        elapsed = time.perf_counter() - start
        progress = max(step / total_steps, elapsed / cfg.max_seconds)
        for group in optimizer.param_groups:
            group["lr"] = cfg.peak_lr * lr_factor(step, progress, cfg)
        batch = sample_batch(stream, cfg, bos_id, gen)
        with autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.steps = step + 1
        out_of_time = time.perf_counter() - start >= cfg.max_seconds
        if result.steps % eval_every and result.steps < total_steps and not out_of_time:
            continue
        v = valid_loss(model, valid, device)
        result.history.append((result.steps, round(loss.item(), 4), round(v, 4)))
        print(f"  epochs={cfg.epochs} step {result.steps}/{total_steps} train {loss.item():.4f} valid {v:.4f} "
              f"lr {optimizer.param_groups[0]['lr']:.2e} "
              f"{result.steps * tokens_per_step / (time.perf_counter() - start):,.0f} tok/s", flush=True)
        if v < result.best_valid_loss:
            result.best_valid_loss, result.best_step, evals_since_best = v, result.steps, 0
            best_state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
        else:
            evals_since_best += 1
        result.stopped_early = evals_since_best >= cfg.patience
        if out_of_time or result.stopped_early:
            break
    result.seconds = round(time.perf_counter() - start, 1)
    result.tokens_seen = result.steps * tokens_per_step
    return best_state, result


def quant_metrics(model, heldout: torch.Tensor, seq_len: int) -> dict[str, float]:
    """Held-out ppl of fp weights, RTN W4 g128 and W3 g128, on all windows and on the slice.

    fp32 math without TF32 (PyTorch's default), so a CPU run reproduces the numbers.
    """
    model = model.float().eval()
    slice_ids = heldout[: SLICE_WINDOWS * seq_len]
    metrics = {"fp": perplexity(model, heldout, seq_len), "slice_fp": perplexity(model, slice_ids, seq_len)}
    for bits in (4, 3):
        quantized = copy.deepcopy(model)
        fake_quantize_decoder_linears(quantized, bits=bits, group_size=128)
        metrics[f"w{bits}g128"] = perplexity(quantized, heldout, seq_len)
        metrics[f"slice_w{bits}g128"] = perplexity(quantized, slice_ids, seq_len)
    metrics["w4g128_increase"] = metrics["w4g128"] / metrics["fp"] - 1
    return {k: round(v, 5) for k, v in metrics.items()}


def fp16_model(config: LlamaConfig, state: dict[str, torch.Tensor], device: torch.device) -> LlamaForCausalLM:
    """The candidate as it will be shipped: weights rounded to fp16 (measured in fp32)."""
    model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.half().float() for k, v in state.items()})
    return model.to(device)


def save_checkpoint(model: LlamaForCausalLM, tokenizer, out_dir: Path) -> None:
    model = model.half()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
    )
    model.save_pretrained(out_dir, max_shard_size=MAX_SHARD_SIZE)


def choose(results: list[dict], min_w4_increase: float) -> int:
    """Index of the lowest validation loss among sensitive-enough candidates (else of the most sensitive)."""
    sensitive = [i for i, r in enumerate(results) if r["heldout"]["w4g128_increase"] >= min_w4_increase]
    if sensitive:
        return min(sensitive, key=lambda i: results[i]["best_valid_loss"])
    return max(range(len(results)), key=lambda i: results[i]["heldout"]["w4g128_increase"])


def train_candidates(args: argparse.Namespace, config: LlamaConfig, stream: torch.Tensor, valid: torch.Tensor,
                     heldout: torch.Tensor, device: torch.device, bos_id: int) -> tuple[list[dict], list[dict]]:
    """One candidate per --epochs value, sharing --max-seconds in proportion; records and best states."""
    results, states = [], []
    for epochs in args.epochs:
        budget = args.max_seconds * epochs / sum(args.epochs)
        cfg = TrainConfig(epochs=epochs, max_seconds=budget, **recipe(args, config))
        state, run = train_one(config, stream, valid, cfg, device, bos_id)
        record = asdict(run)
        record["heldout"] = quant_metrics(fp16_model(config, state, device), heldout, cfg.seq_len)
        print(f"candidate epochs={epochs}: {json.dumps({k: v for k, v in record.items() if k != 'history'})}",
              flush=True)
        results.append(record)
        states.append(state)
    return results, states


def recipe(args: argparse.Namespace, config: LlamaConfig) -> dict:
    """The TrainConfig fields that the command line sets, shared by every candidate."""
    return {"seq_len": config.max_position_embeddings, "batch_size": args.batch_size, "peak_lr": args.peak_lr,
            "weight_decay": args.weight_decay, "adam_eps": args.adam_eps}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with train.txt and valid.txt")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out split for the final numbers")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="reference")
    parser.add_argument("--epochs", type=float, nargs="+", default=[4, 12, 30], help="one candidate per value")
    parser.add_argument("--max-seconds", type=float, default=440, help="training time for all candidates")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--peak-lr", type=float, default=TrainConfig.peak_lr)
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay,
                        help="AdamW weight decay of the matrices, embeddings included (norm weights get none)")
    parser.add_argument("--adam-eps", type=float, default=TrainConfig.adam_eps, help="AdamW epsilon")
    parser.add_argument("--max-train-tokens", type=int, default=0, help="truncate the training stream (dry runs)")
    parser.add_argument("--min-w4-increase", type=float, default=0.02)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = model_config(SHAPES[args.shape], tokenizer)
    recorded = TrainConfig(epochs=0, max_seconds=args.max_seconds, **recipe(args, config))
    seq_len = recorded.seq_len
    t0 = time.perf_counter()
    stream = token_stream(tokenizer, read_documents(args.data / "train.txt"))
    if args.max_train_tokens:
        stream = stream[: args.max_train_tokens]
    stream = stream.to(device)
    valid_ids = token_stream(tokenizer, read_documents(args.data / "valid.txt"))
    valid = valid_ids[: valid_ids.numel() // seq_len * seq_len].view(-1, seq_len)
    heldout = token_stream(tokenizer, read_documents(args.heldout))
    print(f"tokenized: train {stream.numel():,} valid {valid.numel():,} heldout {heldout.numel():,} tokens "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    results, states = train_candidates(args, config, stream, valid, heldout, device, tokenizer.bos_token_id)
    chosen = choose(results, args.min_w4_increase)
    model_dir = args.out / "ref-llama"
    save_checkpoint(fp16_model(config, states[chosen], device), tokenizer, model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    metrics = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "parameters": reloaded.num_parameters(),
        "train_stream_tokens": stream.numel(),
        "heldout_tokens": heldout.numel(),
        "seq_len": seq_len,
        "slice_windows": SLICE_WINDOWS,
        "train_config": asdict(recorded),
        "candidates": results,
        "chosen": chosen,
        "saved": quant_metrics(reloaded, heldout, seq_len),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"saved candidate {chosen} to {model_dir}: {json.dumps(metrics['saved'])}", flush=True)


if __name__ == "__main__":
    main()
