"""A small built-in Llama checkpoint and text corpus, made locally: the no-network default.

``tiny_llama()`` writes a real transformers checkpoint (random weights, a byte-level BPE
tokenizer trained on the shipped corpus) so every command has something to run on without
the Hub or a GPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("LIGHTNING_BRIDGE_CACHE", Path.home() / ".cache" / "lightning_bridge"))
TINY_LLAMA_SHAPES = dict(
    hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
)


# The built-in tokenizer has no chat template; the built-in chat set is rendered with this one.
# Each turn is "<|role|>\n" + content + EOS, so an assistant turn's tokens end with EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def corpus_text() -> str:
    """The small text corpus shipped with the package."""
    return (Path(__file__).parent / "data" / "corpus.txt").read_text()


def chat_set() -> Path:
    """The tiny chat set shipped with the package: JSONL, one ``{"messages": [...]}`` conversation a line."""
    return Path(__file__).parent / "data" / "chat.jsonl"


def tiny_llama(folder: str | os.PathLike | None = None, *, seed: int = 0, vocab_size: int = 512) -> Path:
    """The built-in tiny Llama checkpoint with its tokenizer; built once, then reused."""
    folder = Path(folder) if folder is not None else DEFAULT_CACHE / "tiny-llama"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA_SHAPES,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    staging = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    GenerationConfig.from_model_config(config).save_pretrained(staging)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, folder)
    except OSError:  # another process won the race: its folder is complete (it was renamed whole)
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
        return folder
    logger.info("built the tiny Llama checkpoint in %s", folder)
    return folder


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the built-in corpus (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
