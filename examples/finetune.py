"""Fine-tune an HF model with MegatronBridgeStrategy, save HF checkpoints while training, publish.

    python examples/finetune.py                                   # built-in tiny Llama + corpus, TP=2 on 2 CPU processes
    python examples/finetune.py --model meta-llama/Llama-3.2-1B --text train.txt --accelerator gpu \\
        --devices 8 --tp 2 --pp 2 --max-steps 1000 --save-every 200 \\
        --hub-endpoint https://huggingface.co --repo-id my-org/llama-ft --push-every-checkpoint
    torchrun --nproc_per_node=2 examples/finetune.py              # the same, launched by torchrun

Callbacks:

- ``HFCheckpoint`` writes ``OUTPUT/hf-checkpoints/step-<N>/`` every ``--save-every`` steps and at
  the end (a folder ``AutoModelForCausalLM.from_pretrained`` loads), keeps the newest
  ``--keep-last`` and points ``OUTPUT/hf-checkpoints/latest`` at the newest;
- ``PushToHub`` publishes the final checkpoint (with a model card and a loss plot) to
  ``--repo-id`` at the end of fit; with ``--push-every-checkpoint`` each checkpoint also goes to a
  ``step-<N>`` branch in the background. By default the Hub is a local emulator started by this
  script (``OUTPUT/hub``); ``--hub-endpoint none`` skips publishing.

Lightning starts the processes itself (``devices=N``) unless a launcher such as torchrun did.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_bridge import CausalLMModule, HFCheckpoint, MegatronBridgeStrategy, PushToHub, StepProgressBar
from lightning_bridge.builtin import corpus_text, tiny_llama
from lightning_bridge.data import TokenBlocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or folder (default: the built-in tiny Llama)")
    parser.add_argument("--text", default=None, help="a text file to train on (default: the built-in corpus)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--tp", type=int, default=2, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="per data-parallel replica")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--save-every", type=int, default=None, help="HF checkpoint every N steps (default: max/2)")
    parser.add_argument("--keep-last", type=int, default=2, help="HF checkpoints to keep")
    parser.add_argument("--hub-endpoint", default="local", help="'local' (an emulator), a Hub URL, or 'none'")
    parser.add_argument("--repo-id", default="demo/finetuned")
    parser.add_argument("--push-every-checkpoint", action="store_true", help="also push each to a step-<N> branch")
    parser.add_argument("--output", default="outputs/finetune")
    args = parser.parse_args()

    source = args.model or str(tiny_llama())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    text = Path(args.text).read_text() if args.text else corpus_text()
    blocks = TokenBlocks(text.split("\n\n"), tokenizer, block_size=args.block_size)
    train = DataLoader(blocks, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val = DataLoader(torch.utils.data.Subset(blocks, range(min(len(blocks), 2 * args.batch_size))),
                     batch_size=args.batch_size, drop_last=True)

    checkpoints = HFCheckpoint(dirpath=f"{args.output}/hf-checkpoints", keep_last_k=args.keep_last,
                               every_n_train_steps=args.save_every or max(args.max_steps // 2, 1))
    callbacks: list[pl.Callback] = [checkpoints]
    hub, publish = None, None
    if args.hub_endpoint != "none":
        endpoint = None if args.hub_endpoint == "local" else args.hub_endpoint
        if args.hub_endpoint == "local" and os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
            import huggingface_hub

            from lightning_bridge.testing import HubEmulator

            huggingface_hub.constants.HF_HUB_DISABLE_XET = True  # the emulator speaks plain LFS
            hub = HubEmulator(f"{args.output}/hub").start()  # only global rank 0 talks to the Hub
            endpoint = hub.endpoint
        publish = PushToHub(args.repo_id, endpoint=endpoint, push_every_checkpoint=args.push_every_checkpoint,
                            retry_backoff_s=0.1 if hub else 2.0)
        callbacks.append(publish)

    strategy = MegatronBridgeStrategy(source, tensor_model_parallel_size=args.tp,
                                      pipeline_model_parallel_size=args.pp, micro_batch_size=args.micro_batch_size)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                         strategy=strategy, max_steps=args.max_steps, val_check_interval=max(args.max_steps // 2, 1),
                         check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                         log_every_n_steps=1, default_root_dir=args.output, callbacks=[*callbacks, StepProgressBar()])
    module = CausalLMModule(learning_rate=args.lr, warmup_steps=max(args.max_steps // 10, 1))
    started = time.perf_counter()
    try:
        trainer.fit(module, train, val)
    finally:
        if hub is not None:
            hub.stop()
    fit_s = time.perf_counter() - started
    if trainer.is_global_zero:
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
        print(f"fit: {trainer.global_step} steps in {fit_s:.1f} s, {module.tokens_seen} tokens; metrics {metrics}")
        for save in checkpoints.save_stats:
            print(f"HF checkpoint: {save['path']} (training blocked {save['blocked_s']:.2f} s)")
        for push in publish.results if publish else []:
            print(f"pushed: {push.folder} -> {push.revision}: {push.commit_url or push.error}")
        if publish is not None and publish.failure:
            raise SystemExit(publish.failure)  # the reason, and the command that redoes the push


if __name__ == "__main__":
    main()
