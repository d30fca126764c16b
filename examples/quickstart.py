"""The main job: fine-tune, checkpoint, publish, reload, generate. No network, no GPU needed.

    python examples/quickstart.py          # built-in tiny Llama + corpus, TP=2 on 2 CPU processes (`make demo`)

    # a real run: any supported HF model, your text, GPUs, the real Hub
    python examples/quickstart.py --model meta-llama/Llama-3.2-1B --data train.txt \\
        --accelerator gpu --devices 8 --tp 2 --pp 2 --max-steps 1000 \\
        --hub-endpoint https://huggingface.co --repo-id my-org/llama-ft      # HF_TOKEN set

1. fine-tunes the model on the text with MegatronBridgeStrategy (TP x PP x DP over --devices),
2. writes HF checkpoints with HFCheckpoint (``OUTPUT/hf-checkpoints/step-<N>/``),
3. publishes the final one with PushToHub, by default to a local Hub emulator (``OUTPUT/hub``),
4. downloads it back, loads it with transformers and generates a few tokens,
5. prints a summary (checkpoints, losses, timings) and writes it to ``OUTPUT/summary.json``.

``--data`` is a text file; paragraphs (separated by blank lines) are tokenized and packed into
blocks of ``--block-size`` tokens. Lightning starts the processes itself; under torchrun it uses
torchrun's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import huggingface_hub
import lightning.pytorch as pl
import torch
import transformers
from torch.utils.data import DataLoader

from lightning_bridge import CausalLMModule, HFCheckpoint, MegatronBridgeStrategy, PushToHub, StepProgressBar
from lightning_bridge.builtin import corpus_text, tiny_llama
from lightning_bridge.data import TokenBlocks
from lightning_bridge.testing import HubEmulator

LOCAL_HUB = "local"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or folder (default: the built-in tiny Llama)")
    parser.add_argument("--data", default=None, help="a text file to train on (default: the built-in corpus)")
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument("--devices", type=int, default=2, help="processes (GPUs) per node")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--tp", type=int, default=2, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the whole batch (PP: 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per data-parallel replica and step")
    parser.add_argument("--block-size", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--save-every", type=int, default=None, help="HF checkpoint every N steps (default: max/2)")
    parser.add_argument("--hub-endpoint", default=LOCAL_HUB,
                        help="'local' (an emulator under OUTPUT/hub) or a Hub URL such as https://huggingface.co")
    parser.add_argument("--repo-id", default="demo/tiny-llama-finetuned", help="the Hub repo to publish to")
    parser.add_argument("--prompt", default="The red cat lives near")
    parser.add_argument("--output", default="outputs/quickstart")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    output = Path(args.output)
    timings: dict[str, float] = {}
    is_launcher = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"

    # Data: text -> token blocks of --block-size; every rank builds the same dataset.
    source = args.model or str(tiny_llama())
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    text = Path(args.data).read_text() if args.data else corpus_text()
    blocks = TokenBlocks(text.split("\n\n"), tokenizer, block_size=args.block_size)
    train = DataLoader(blocks, batch_size=args.batch_size, shuffle=True, drop_last=True)

    # Where checkpoints are published: a local Hub emulator (started once, by the launching process).
    huggingface_hub.constants.HF_HUB_DISABLE_XET = True  # the emulator speaks plain LFS
    hub = HubEmulator(output / "hub").start() if args.hub_endpoint == LOCAL_HUB and is_launcher else None
    endpoint = hub.endpoint if hub else (None if args.hub_endpoint == LOCAL_HUB else args.hub_endpoint)
    try:
        checkpoints = HFCheckpoint(dirpath=output / "hf-checkpoints", keep_last_k=2,
                                   every_n_train_steps=args.save_every or max(args.max_steps // 2, 1))
        publish = PushToHub(args.repo_id, endpoint=endpoint, retry_backoff_s=0.1 if hub else 2.0)
        strategy = MegatronBridgeStrategy(source, tensor_model_parallel_size=args.tp,
                                          pipeline_model_parallel_size=args.pp,
                                          micro_batch_size=args.micro_batch_size)
        trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                             max_steps=args.max_steps, strategy=strategy, callbacks=[checkpoints, publish, StepProgressBar()],
                             logger=False, enable_checkpointing=False, enable_model_summary=False,
                             log_every_n_steps=1, default_root_dir=output)
        module = CausalLMModule(learning_rate=args.lr, warmup_steps=max(args.max_steps // 10, 1))
        started = time.perf_counter()
        trainer.fit(module, train)
        timings["fit_s"] = time.perf_counter() - started
        if not trainer.is_global_zero:
            return

        if publish.failure:
            raise SystemExit(publish.failure)  # it says why, and the command that redoes the push
        # Download what was published, load it with transformers, generate.
        started = time.perf_counter()
        downloaded = huggingface_hub.snapshot_download(args.repo_id, endpoint=endpoint,
                                                       cache_dir=output / "download-cache")
        model = transformers.AutoModelForCausalLM.from_pretrained(downloaded)
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        timings["reload_and_generate_s"] = time.perf_counter() - started
    finally:
        if hub is not None:
            hub.stop()

    pushed = publish.results[-1] if publish.results else None
    if pushed is not None and pushed.finished is not None:
        timings["push_s"] = pushed.finished - pushed.started
    summary = {
        "model": source,
        "layout": {"tp": args.tp, "pp": args.pp, "dp": trainer.world_size // (args.tp * args.pp),
                   "processes": trainer.world_size, "accelerator": args.accelerator},
        "steps": trainer.global_step,
        "tokens": module.tokens_seen,
        "losses": [[step, round(loss, 4)] for step, loss in publish.losses],
        "checkpoints": [{"step": s["step"], "path": s["path"], "blocked_s": round(s["blocked_s"], 3),
                         "total_s": round(s["total_s"], 3)} for s in checkpoints.save_stats],
        "kept_checkpoints": sorted(str(p) for p in checkpoints.dirpath.glob("step-*")),
        "published": {"repo_id": args.repo_id, "endpoint": endpoint,
                      "commit_url": pushed.commit_url if pushed else None,
                      "error": publish.failure},
        "downloaded": str(downloaded),
        "generated": tokenizer.decode(generated[0]),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, output)


def print_summary(summary: dict, output: Path) -> None:
    """The few lines a newcomer reads: where things are, how the loss went, how long it took."""
    layout, losses, timings = summary["layout"], summary["losses"], summary["timings"]
    print("\n=== lightning-bridge quickstart ===")
    print(f"model        {summary['model']}")
    print(f"layout       TP={layout['tp']} PP={layout['pp']} DP={layout['dp']} on {layout['processes']} "
          f"{layout['accelerator']} process(es)")
    print(f"training     {summary['steps']} steps, {summary['tokens']} tokens, fit {timings['fit_s']:.1f} s (with set-up); "
          f"train_loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}")
    for save in summary["checkpoints"]:
        print(f"checkpoint   {save['path']}  (training blocked {save['blocked_s']:.2f} s, "
              f"written in {save['total_s']:.2f} s)")
    print(f"kept         {summary['kept_checkpoints']}")
    print(f"published    {summary['published']['commit_url'] or summary['published']['error']}")
    print(f"push         {timings.get('push_s', float('nan')):.2f} s")
    print(f"reloaded     {summary['downloaded']}  ({timings['reload_and_generate_s']:.1f} s with generation)")
    print(f"generated    {summary['generated']!r}")
    print(f"summary      {output / 'summary.json'}")


if __name__ == "__main__":
    main()
