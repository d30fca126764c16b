"""The built-in tiny Llama and corpus: the no-network default."""

from __future__ import annotations

import transformers

from lightning_bridge.builtin import corpus_text, tiny_llama


def test_tiny_llama_is_a_real_checkpoint_with_a_tokenizer(tmp_path):
    folder = tiny_llama(tmp_path / "tiny")
    assert tiny_llama(folder) == folder  # built once, then reused
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("The red cat lives near the river.", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "The red cat lives near the river."
    assert model(ids).logits.shape[-1] == len(tokenizer)
    assert "Zen of Python" in corpus_text()
