"""Supervised fine-tuning end to end: chats in, loss on the answers only, HF checkpoints out, published.

    python examples/sft_quickstart.py       # built-in tiny Llama + built-in chat set, TP=2 on 2 CPU processes
    python examples/sft_quickstart.py --lora-r 8   # the same with LoRA on every linear layer: a PEFT adapter out

    # a real run: an instruct model, your chats (JSONL/Parquet/Arrow/CSV or a Hub dataset id), GPUs
    python examples/sft_quickstart.py --model meta-llama/Llama-3.2-1B-Instruct --data chats.jsonl \\
        --max-length 2048 --packing --accelerator gpu --devices 8 --tp 2 --max-steps 1000 \\
        --hub-endpoint https://huggingface.co --repo-id my-org/llama-sft         # HF_TOKEN set

1. reads the chats with SFTDataModule (a ``messages`` column; or ``prompt``/``completion``, or
   ``text``), renders them with the tokenizer's chat template, labels only the assistant turns;
   ``--packing`` puts several chats in one row of ``--max-length`` tokens,
2. fine-tunes with MegatronBridgeStrategy (TP x PP x DP over --devices),
3. writes HF checkpoints with HFCheckpoint and publishes the last with PushToHub (by default to a
   local Hub emulator under ``OUTPUT/hub``),
4. downloads it back, loads it with transformers and answers a question,
5. prints a summary and writes it to ``OUTPUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import huggingface_hub
import lightning.pytorch as pl
import torch
import transformers

from lightning_bridge import (CausalLMModule, HFCheckpoint, MegatronBridgeStrategy, PushToHub, SFTDataModule,
                              StepProgressBar)
from lightning_bridge.builtin import CHAT_TEMPLATE, tiny_llama
from lightning_bridge.testing import HubEmulator

LOCAL_HUB = "local"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF id or folder (default: the built-in tiny Llama)")
    parser.add_argument("--data", default=None, help="a file, folder or Hub dataset id (default: the built-in chats)")
    parser.add_argument("--chat-template", default=None, help="a Jinja string or .jinja file (default: the tokenizer's)")
    parser.add_argument("--packing", action="store_true", help="several chats per --max-length row")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sequence (longer ones truncated)")
    parser.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    parser.add_argument("--devices", type=int, default=2, help="processes (GPUs) per node")
    parser.add_argument("--tp", type=int, default=2, help="tensor_model_parallel_size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per data-parallel replica and step")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lora-r", type=int, default=0,
                        help="train LoRA adapters of this rank instead of every weight (0: full fine-tuning)")
    parser.add_argument("--lora-targets", default="all-linear", help="comma-separated HF module names, or all-linear")
    parser.add_argument("--hub-endpoint", default=LOCAL_HUB,
                        help="'local' (an emulator under OUTPUT/hub) or a Hub URL such as https://huggingface.co")
    parser.add_argument("--repo-id", default="demo/tiny-llama-sft", help="the Hub repo to publish to")
    parser.add_argument("--question", default="What is 4 plus 4?")
    parser.add_argument("--output", default="outputs/sft_quickstart")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    output = Path(args.output)
    is_launcher = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"
    source = args.model or str(tiny_llama())
    data = SFTDataModule(args.data, tokenizer=source, chat_template=args.chat_template, max_length=args.max_length,
                         packing=args.packing, batch_size=args.batch_size)

    huggingface_hub.constants.HF_HUB_DISABLE_XET = True  # the emulator speaks plain LFS
    hub = HubEmulator(output / "hub").start() if args.hub_endpoint == LOCAL_HUB and is_launcher else None
    endpoint = hub.endpoint if hub else (None if args.hub_endpoint == LOCAL_HUB else args.hub_endpoint)
    try:
        checkpoints = HFCheckpoint(dirpath=output / "hf-checkpoints", every_n_train_steps=args.max_steps)
        publish = PushToHub(args.repo_id, endpoint=endpoint, retry_backoff_s=0.1 if hub else 2.0)
        lora = None
        if args.lora_r:
            from peft import LoraConfig

            targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
            lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets)
        strategy = MegatronBridgeStrategy(source, tensor_model_parallel_size=args.tp,
                                          pipeline_model_parallel_size=args.pp, peft=lora)
        trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, max_steps=args.max_steps,
                             strategy=strategy, callbacks=[checkpoints, publish, StepProgressBar()], logger=False,
                             enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1,
                             default_root_dir=output)
        module = CausalLMModule(learning_rate=args.lr, warmup_steps=max(args.max_steps // 10, 1))
        trainer.fit(module, datamodule=data)
        if not trainer.is_global_zero:
            return
        if publish.failure:
            raise SystemExit(publish.failure)

        # Download what was published, load it with transformers, answer a question in the chat format.
        downloaded = huggingface_hub.snapshot_download(args.repo_id, endpoint=endpoint,
                                                       cache_dir=output / "download-cache")
        if lora is None:
            model = transformers.AutoModelForCausalLM.from_pretrained(downloaded)
            tokenizer = transformers.AutoTokenizer.from_pretrained(downloaded)
        else:  # a PEFT adapter repo: the adapter on the untouched base model
            from peft import PeftModel

            model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(source), downloaded)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        template = args.chat_template or tokenizer.chat_template or CHAT_TEMPLATE
        if template.endswith(".jinja"):
            template = Path(template).read_text()
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.question}], chat_template=template,
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=12, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        if hub is not None:
            hub.stop()

    first = data.train_set[0]
    summary = {
        "model": source,
        "data": args.data or "built-in chat set",
        "training_sequences": len(data.train_set),
        "packing": args.packing,
        "lora_r": args.lora_r,
        "first_sequence": {"tokens": int(first["input_ids"].ne(tokenizer.pad_token_id).sum()),
                           "counted": int(first["labels"].ne(-100).sum())},
        "steps": trainer.global_step,
        "losses": [[step, round(loss, 4)] for step, loss in publish.losses],
        "published": publish.results[-1].commit_url if publish.results else None,
        "question": args.question,
        "answer": answer,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n=== lightning-bridge SFT quickstart ===")
    print(f"data         {summary['data']}: {summary['training_sequences']} training sequences "
          f"({'packed' if args.packing else 'one chat each'}); the first has {summary['first_sequence']['tokens']} "
          f"tokens, {summary['first_sequence']['counted']} of them assistant tokens (the loss counts only those)")
    losses = summary["losses"]
    print(f"training     {summary['steps']} steps; train_loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}")
    print(f"published    {summary['published']}")
    print(f"answer       {args.question!r} -> {answer!r}")
    print(f"summary      {output / 'summary.json'}")


if __name__ == "__main__":
    main()
