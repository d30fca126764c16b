"""Tokens/s, TFLOP/s per GPU and MFU of Megatron training paths beside transformers, in one run.

    python benchmarks/train_mfu.py --out /tmp/mfu.json                    # Llama-3.2-1B shapes, seq 2048
    python benchmarks/train_mfu.py --shapes llama3-8b-12l --seq 2048,4096 --out /tmp/mfu-8b.json
    python benchmarks/train_mfu.py --shapes mixtral-moe --out /tmp/mfu-moe.json

One process, one GPU, the same shapes, batch, micro-batch, sequence length and counting-sequence
data for every path (``--paths``, run one after another, memory freed in between):

- ``mcore``: the plain Megatron-Core loop of ``train_vs_mcore.py`` (bf16, Megatron DDP, distributed
  Adam) with the fused core attention (``attention_backend="auto"``, ``lightning_bridge.attention``);
- ``mcore-unfused``: the same with megatron-core's unfused ``DotProductAttention`` ("local");
- ``mcore-sequential-experts``: ``mcore`` with MoE experts one after another (megatron-core's
  ``SequentialMLP``) instead of grouped GEMMs (``lightning_bridge.experts``, the default on CUDA);
- ``strategy``: ``MegatronBridgeStrategy`` (fused attention) under ``Trainer.fit`` (not in the default set);
- ``strategy-lora``: the same training LoRA adapters (r=16, every linear layer, ``peft.LoraConfig``) on
  the frozen model. Its MFU column uses the full-training formula (no weight gradients are computed
  for frozen weights): compare its step time and peak memory with ``strategy``'s. For the issue's
  figures: ``--shapes llama3-8b-12l --paths strategy,strategy-lora`` and ``--shapes llama3-8b --paths
  strategy-lora`` (the full 32 layers, which full fine-tuning cannot fit on one GPU with Adam);
- ``hf``: transformers' model with SDPA attention, fp32 weights under bf16 autocast, fused AdamW;
- ``hf-compile``: the same, ``torch.compile``d.

Weights are random (Megatron's init, transformers' init): only speed is measured. Step time is the
mean after ``--warmup`` steps (compilation falls in the warm-up). FLOPs per token follow the usual
convention: 6 x matmul parameters (active ones for MoE: top-k experts and the router) + 12 x layers
x seq x hidden (attention scores and values, causality not discounted); MFU against ``--peak-tflops``
(989: H100/H200 dense bf16). Prints one summary table; ``--out`` gets every figure as JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from types import SimpleNamespace

import torch
from shapes import SHAPES, llama_config
from torch.utils.data import DataLoader
from train_throughput import CountingSequences
from train_vs_mcore import run_mcore, run_strategy, timed_steps

PATHS = ("mcore", "mcore-unfused", "mcore-sequential-experts", "strategy", "strategy-lora", "hf", "hf-compile")
DEFAULT_PATHS = ("mcore", "mcore-unfused", "hf", "hf-compile")
FORMULA = ("FLOPs/token = 6 x matmul params + 12 x layers x seq x hidden; TFLOP/s = FLOPs/token x tokens/s; "
           "MFU = TFLOP/s / peak")


def matmul_params(config) -> int:
    """Parameters that take part in a matmul per token: attention and (active) MLP weights of every
    layer, the router, and the output layer (the embedding lookup is not a matmul)."""
    h, heads = config.hidden_size, config.num_attention_heads
    kv = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    experts = getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0
    active = config.num_experts_per_tok if experts else 1
    ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    mlp = 3 * h * ffn * active + h * experts
    return config.num_hidden_layers * (attention + mlp) + config.vocab_size * h


def flops_per_token(config, seq: int) -> int:
    return 6 * matmul_params(config) + 12 * config.num_hidden_layers * seq * config.hidden_size


def run_hf(args, config, data: DataLoader, compile_model: bool) -> tuple[list[float], list[float]]:
    """transformers' training step: fp32 weights, bf16 autocast, SDPA, fused AdamW, micro-batches."""
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU (--shapes tiny) only checks it runs
    config = copy.deepcopy(config)
    config.dtype = torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                              dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=device == "cuda")
    forward = torch.compile(model) if compile_model else model

    def step(batch):
        ids = batch["input_ids"].to(device, non_blocking=True)
        total = torch.zeros((), device=device)
        micros = range(0, ids.shape[0], args.micro)
        for i in micros:
            micro = ids[i:i + args.micro]
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = forward(input_ids=micro, labels=micro).loss / len(micros)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return timed_steps(data, args.steps, step)


def run_path(path: str, args, config, data: DataLoader):
    from lightning_bridge import AutoBridge

    run_args = SimpleNamespace(**vars(args), tp=1, pp=1)
    if path.startswith("mcore"):
        run_args.attention_backend = "local" if path == "mcore-unfused" else "auto"
        run_args.expert_backend = "sequential" if path == "mcore-sequential-experts" else "auto"
        return run_mcore(run_args, config, data)
    if path.startswith("strategy"):
        run_args.attention_backend = "auto"
        run_args.lora = path == "strategy-lora"
        return run_strategy(run_args, AutoBridge.from_hf_config(config, torch_dtype=torch.bfloat16), data)
    return run_hf(args, config, data, compile_model=path == "hf-compile")


def free_memory() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():  # a fresh (empty) buffer: drop the unfused attention's scores
        ps.destroy_global_memory_buffer()
        ps._set_global_memory_buffer()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="llama3.2-1b", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--seq", default="2048", help="comma-separated sequence lengths")
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"comma-separated, of {list(PATHS)}")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--micro", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the mean (compilation)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--precision", default="bf16-mixed", help="the strategy path's Lightning precision")
    args = parser.parse_args()
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - set(PATHS)) + sorted(set(args.shapes.split(",")) - set(SHAPES))
    if unknown:
        parser.error(f"unknown paths or shapes {unknown}; paths: {list(PATHS)}, shapes: {sorted(SHAPES)}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (only checks that it runs)"
    print(FORMULA, f"(peak {args.peak_tflops:g} TFLOP/s, {device})", flush=True)
    results = []
    started = time.perf_counter()
    for shapes in args.shapes.split(","):
        for seq in (int(s) for s in args.seq.split(",")):
            config = llama_config(shapes, torch.bfloat16)
            config.max_position_embeddings = max(config.max_position_embeddings, seq)
            flops = flops_per_token(config, seq)
            for path in paths:
                data = DataLoader(CountingSequences(args.steps * args.batch, seq, config.vocab_size),
                                  batch_size=args.batch, drop_last=True)
                free_memory()
                path_start = time.perf_counter()
                step_times, losses = run_path(path, args, config, data)
                steady = step_times[args.warmup:]
                step_s = sum(steady) / len(steady)
                tokens_per_s = args.batch * seq / step_s
                tflops = flops * tokens_per_s / 1e12
                result = {
                    "shapes": shapes, "seq": seq, "path": path, "batch": args.batch, "micro_batch": args.micro,
                    "steps": len(step_times), "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s),
                    "tflops_per_gpu": round(tflops, 1), "mfu": round(tflops / args.peak_tflops, 4),
                    "flops_per_token": flops, "matmul_params": matmul_params(config),
                    "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                    "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                                         else 0.0, 1),
                    "wall_s": round(time.perf_counter() - path_start, 1), "device": device,
                }
                results.append(result)
                print("FIGURES " + json.dumps(result), flush=True)
                if args.out:  # written as it goes: a run cut short keeps what it measured
                    with open(args.out, "w") as f:
                        json.dump({"formula": FORMULA, "peak_tflops": args.peak_tflops, "results": results}, f,
                                  indent=1)
    print(f"\n{FORMULA}; peak {args.peak_tflops:g} TFLOP/s; {device}; total {time.perf_counter() - started:.0f} s")
    print(f"{'shapes':<15}{'seq':>6} {'path':<15}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'vs hf':>7}"
          f"{'peak GB':>9}{'loss':>17}")
    for r in results:
        hf = next((x for x in results if x["shapes"] == r["shapes"] and x["seq"] == r["seq"]
                   and x["path"] == "hf"), None)
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        print(f"{r['shapes']:<15}{r['seq']:>6} {r['path']:<15}{r['tokens_per_s']:>10,}{r['tflops_per_gpu']:>9.1f}"
              f"{100 * r['mfu']:>6.1f}%{ratio:>7}{r['peak_gpu_gb']:>9.1f}"
              f"{r['loss_first']:>8.3f}->{r['loss_last']:.3f}")


if __name__ == "__main__":
    main()
