"""The main job: fine-tune, checkpoint, publish, reload, generate. No network, no GPU needed.

    python examples/quickstart.py          # built-in tiny Llama + corpus, TP=2 on 2 CPU processes

1. fine-tunes the built-in tiny Llama on the shipped corpus with MegatronBridgeStrategy (TP=2),
2. writes HF checkpoints with HFCheckpoint,
3. publishes the final one with PushToHub to a local Hub emulator,
4. downloads it back, loads it with transformers and generates a few tokens,
5. prints a summary. Pass --model/--devices/--tp/--pp/--accelerator for a real run.
"""

from __future__ import annotations

import argparse
import os
import time

import huggingface_hub
import lightning.pytorch as pl
import torch
import transformers
from torch.utils.data import DataLoader

from lightning_bridge import CausalLMModule, HFCheckpoint, MegatronBridgeStrategy, PushToHub
from lightning_bridge.builtin import corpus_text, tiny_llama
from lightning_bridge.data import TokenBlocks
from lightning_bridge.testing import HubEmulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or folder (default: the built-in tiny Llama)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--output", default="outputs/quickstart")
    args = parser.parse_args()
    is_launcher = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"

    source = args.model or str(tiny_llama())
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    blocks = TokenBlocks(corpus_text().split("\n\n"), tokenizer, block_size=64)
    train = DataLoader(blocks, batch_size=8, shuffle=True, drop_last=True)

    huggingface_hub.constants.HF_HUB_DISABLE_XET = True  # the emulator speaks plain LFS
    hub = HubEmulator(os.path.join(args.output, "hub")).start() if is_launcher else None
    checkpoints = HFCheckpoint(dirpath=os.path.join(args.output, "hf-checkpoints"),
                               every_n_train_steps=max(args.max_steps // 2, 1), keep_last_k=2)
    publish = PushToHub("demo/tiny-llama-finetuned", endpoint=hub.endpoint if hub else None, retry_backoff_s=0.1)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, max_steps=args.max_steps,
                         strategy=MegatronBridgeStrategy(source, tensor_model_parallel_size=args.tp,
                                                         pipeline_model_parallel_size=args.pp),
                         callbacks=[checkpoints, publish], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, log_every_n_steps=1)
    module = CausalLMModule(learning_rate=3e-3, warmup_steps=4)
    started = time.perf_counter()
    trainer.fit(module, train)
    fit_s = time.perf_counter() - started
    if not trainer.is_global_zero:
        return

    downloaded = huggingface_hub.snapshot_download("demo/tiny-llama-finetuned", endpoint=hub.endpoint,
                                                   cache_dir=os.path.join(args.output, "download-cache"))
    model = transformers.AutoModelForCausalLM.from_pretrained(downloaded)
    prompt = "The red cat lives near"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    hub.stop()
    losses = publish.losses
    print("\n=== lightning-bridge quickstart ===")
    print(f"model        {source}")
    print(f"layout       TP={args.tp} PP={args.pp} on {trainer.world_size} process(es)")
    print(f"training     {trainer.global_step} steps in {fit_s:.1f} s, {module.tokens_seen} tokens; "
          f"train_loss {losses[0][-1]:.3f} -> {losses[-1][-1]:.3f}")
    print(f"checkpoints  {[s['path'] for s in checkpoints.save_stats]}")
    print(f"published    {publish.results[-1].commit_url if publish.results else 'nothing'}")
    print(f"reloaded     {downloaded}")
    print(f"generated    {tokenizer.decode(generated[0])!r}")


if __name__ == "__main__":
    main()
