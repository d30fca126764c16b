"""SFTDataModule: chat / prompt-completion / text columns, answer-only labels, packing, DP shares, errors."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

# a dependency (installed in CI); the GPU machines lack it, and `pytest -m gpu tests/` must still collect
datasets = pytest.importorskip("datasets")

from lightning_bridge.builtin import CHAT_TEMPLATE, build_tokenizer
from lightning_bridge.sft_data import SFTDataModule, pack

CHATS = [
    [{"role": "user", "content": "What is 3 plus 3?"}, {"role": "assistant", "content": "3 plus 3 is 6."}],
    [{"role": "system", "content": "You count."}, {"role": "user", "content": "Count from 4."},
     {"role": "assistant", "content": "4, 5, 6, 7, 8."}],
    [{"role": "user", "content": "Where does the fox walk?"},
     {"role": "assistant", "content": "Every morning the fox walks to the river and back."},
     {"role": "user", "content": "And 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."}],
] * 4  # 12 conversations


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _module(tmp_path, tokenizer_folder, dataset, **kwargs):
    kwargs = {"chat_template": CHAT_TEMPLATE, "batch_size": 2, "shuffle": False, **kwargs}
    data = SFTDataModule(dataset, tokenizer_folder, cache_dir=str(tmp_path / "cache"), **kwargs)
    data.setup("fit")
    return data


def _counted_runs(labels: torch.Tensor) -> list[list[int]]:
    """The maximal runs of counted (not -100) labels."""
    runs, current = [], []
    for label in labels.tolist():
        if label != -100:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_chat_labels_cover_exactly_the_assistant_turns(tmp_path, tokenizer_folder, tokenizer):
    data = _module(tmp_path, tokenizer_folder, _jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS]))
    assert len(data.train_set) == 12
    for index, messages in enumerate(CHATS[:3]):
        item = data.train_set[index]
        ids, labels = item["input_ids"], item["labels"]
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE,
                                                                      tokenize=False)
        counted = labels != -100
        assert torch.equal(labels[counted], ids[counted])  # labels are the tokens themselves
        answers = [m["content"] + "</s>" for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in _counted_runs(labels)] == answers  # each turn, and only it
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}  # unpacked: no position_ids
    assert batch["input_ids"].shape[1] % 8 == 0  # padded to the longest, a multiple of pad_to_multiple_of
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["labels"][padding] == -100).all()
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()


def test_the_tokenizers_own_template_and_the_builtin_chat_set(tmp_path, tokenizer_folder, tokenizer):
    own = tmp_path / "own"
    tokenizer.chat_template = CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]")
    tokenizer.save_pretrained(own)
    tokenizer.chat_template = None
    data = _module(tmp_path, str(own), datasets.Dataset.from_list([{"messages": m} for m in CHATS]),
                   chat_template=None)
    assert tokenizer.decode(data.train_set[0]["input_ids"]).startswith("<s>[user]\nWhat is 3 plus 3?</s>[assistant]")
    builtin = _module(tmp_path, tokenizer_folder, None, chat_template=None)  # no template: CHAT_TEMPLATE
    assert len(builtin.train_set) == 48
    assert tokenizer.decode(builtin.train_set[0]["input_ids"]).startswith("<s><|user|>\n")


def test_prompt_completion_counts_the_completion_and_text_counts_everything(tmp_path, tokenizer_folder, tokenizer):
    pairs = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(1, 5)]
    item = _module(tmp_path, tokenizer_folder, datasets.Dataset.from_list(pairs)).train_set[0]
    assert tokenizer.decode(item["input_ids"]) == "What is 1 plus 1? 2.</s>"
    assert [tokenizer.decode(run) for run in _counted_runs(item["labels"])] == [" 2.</s>"]

    chats = [{"prompt": m[:-1], "completion": m[-1:]} for m in CHATS]  # conversational: the last answer counts
    item = _module(tmp_path, tokenizer_folder, datasets.Dataset.from_list(chats)).train_set[2]
    assert [tokenizer.decode(run) for run in _counted_runs(item["labels"])] == ["2 plus 2 is 4.</s>"]

    texts = datasets.Dataset.from_list([{"text": "The red cat lives near the river."}] * 2)
    item = _module(tmp_path, tokenizer_folder, texts).train_set[0]
    assert torch.equal(item["labels"], item["input_ids"]) and item["input_ids"][-1] == tokenizer.eos_token_id

    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(pairs).to_parquet(str(parquet))
    assert len(_module(tmp_path, tokenizer_folder, str(parquet)).train_set) == 4


def test_long_sequences_are_truncated_or_dropped_and_counted_in_the_log(tmp_path, tokenizer_folder, caplog):
    rows = [{"text": "short."}] * 4 + [{"text": "The red cat lives near the river. " * 20}] * 2
    source = _jsonl(tmp_path / "texts.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="lightning_bridge.sft_data"):
        truncated = _module(tmp_path, tokenizer_folder, source, max_length=32)
        assert "tokenized 6 examples (text): 6 kept, 2 truncated to max_length=32, 0 dropped" in caplog.text
        assert max(len(truncated.train_set[i]["input_ids"]) for i in range(6)) == 32
        dropped = _module(tmp_path, tokenizer_folder, source, max_length=32, overlong="drop")
        assert "4 kept, 0 truncated to max_length=32, 2 dropped as longer than max_length" in caplog.text
    assert len(dropped.train_set) == 4


def test_packed_rows_restart_positions_at_each_example_and_pad_at_the_end(tmp_path, tokenizer_folder, tokenizer):
    data = _module(tmp_path, tokenizer_folder, datasets.Dataset.from_list([{"messages": m} for m in CHATS]),
                   packing=True, max_length=96)
    examples = _module(tmp_path, tokenizer_folder, datasets.Dataset.from_list([{"messages": m} for m in CHATS]),
                       max_length=96).train_set
    assert len(data.train_set) < len(examples)
    placed = []
    for row_index, row in enumerate(data.train_set.rows):
        item = data.train_set[row_index]
        assert set(item) == {"input_ids", "labels", "position_ids", "attention_mask"}
        assert all(t.shape == (96,) for t in item.values())
        real = int(item["attention_mask"].sum())
        assert torch.equal(item["attention_mask"][:real], torch.ones(real, dtype=torch.long))  # padding at the end
        assert (item["labels"][real:] == -100).all() and (item["input_ids"][real:] == tokenizer.pad_token_id).all()
        starts = (item["position_ids"][:real] == 0).nonzero().flatten().tolist()
        bounds = starts + [real]
        assert len(starts) == len(row)
        for (start, end), index in zip(zip(bounds, bounds[1:]), row):
            expected = examples[index]
            assert torch.equal(item["input_ids"][start:end], expected["input_ids"])
            assert torch.equal(item["position_ids"][start:end], torch.arange(end - start))
            assert item["labels"][start] == -100  # not predicted from the previous example
            assert torch.equal(item["labels"][start + 1:end], expected["labels"][1:])
        assert torch.equal(item["position_ids"][real:], torch.arange(96 - real) + item["position_ids"][real - 1] + 1)
        placed += row
    assert sorted(placed) == list(range(12))
    batch = next(iter(data.train_dataloader()))
    assert batch["position_ids"].shape == (2, 96)


def test_pack_fills_rows_best_fit_decreasing():
    assert pack([5, 3, 4, 2, 6, 1], 8) == [[4, 3], [0, 1], [2, 5]]
    assert sorted(sum(pack([7] * 5 + [1] * 5, 8), [])) == list(range(10))


def test_data_parallel_replicas_read_disjoint_shares(tmp_path, tokenizer_folder):
    data = _module(tmp_path, tokenizer_folder, datasets.Dataset.from_list([{"text": f"number {i}"} for i in range(12)]),
                   shuffle=True, batch_size=2)
    shares = []
    for rank in (0, 1):
        data.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2,
                                                                                            "rank": rank}))
        shares.append({tuple(row[row != -100].tolist()) for batch in data.train_dataloader()
                       for row in batch["labels"]})
    assert len(shares[0]) == len(shares[1]) == 6 and not shares[0] & shares[1]
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 8, "rank": 0}))
    with pytest.raises(ValueError, match=r"The training set has 12 examples, fewer than one global batch "
                                         r"\(batch_size=2 x 8 data-parallel replicas\)"):
        data.train_dataloader()


def test_errors_name_the_input_and_the_fix(tmp_path, tokenizer_folder):
    with pytest.raises(ValueError, match=r"The dataset has columns \['question', 'answer'\]; SFTDataModule reads a "
                                         r"'messages' column .* or a 'text' column\. Rename a column"):
        _module(tmp_path, tokenizer_folder, datasets.Dataset.from_list([{"question": "a", "answer": "b"}]))
    with pytest.raises(ValueError, match="The dataset has no examples"):
        _module(tmp_path, tokenizer_folder, _jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(ValueError, match=r"has no chat template, so the 'messages' conversations cannot be rendered\. "
                                         r"Pass one as chat_template="):
        _module(tmp_path, tokenizer_folder, datasets.Dataset.from_list([{"messages": CHATS[0]}]), chat_template=None)
    with pytest.raises(ValueError, match=r"No example is left to train on: of 2, 2 are longer than max_length=4"):
        _module(tmp_path, tokenizer_folder, datasets.Dataset.from_list([{"text": "the red cat lives near"}] * 2),
                max_length=4, overlong="drop")
    with pytest.raises(FileNotFoundError, match=r"dataset='missing\.jsonl' does not exist"):
        _module(tmp_path, tokenizer_folder, "missing.jsonl")
    with pytest.raises(ValueError, match=r"val_examples=1 give 1 validation sequences, fewer than one global batch"):
        _module(tmp_path, tokenizer_folder, datasets.Dataset.from_list([{"text": "a b"}] * 4),
                val_examples=1).val_dataloader()
    with pytest.raises(ValueError, match="overlong='cut': use 'truncate' or 'drop'"):
        SFTDataModule(overlong="cut")


def test_packed_and_unpacked_batches_give_the_same_loss():
    """The built-in chat set through MegatronBridgeStrategy: packed rows (examples that do not see each
    other, positions restarting) and one example per row count the same tokens with the same loss."""
    import lightning.pytorch as pl

    from lightning_bridge import CausalLMModule, MegatronBridgeStrategy
    from lightning_bridge.builtin import tiny_llama

    losses = {}
    for packing in (False, True):
        data = SFTDataModule(tokenizer=str(tiny_llama()), packing=packing, max_length=256, batch_size=1,
                             val_examples=6, shuffle=False)
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MegatronBridgeStrategy(str(tiny_llama())),
                             logger=False, enable_progress_bar=False, enable_model_summary=False)
        (metrics,) = trainer.validate(CausalLMModule(), datamodule=data)
        losses[packing] = metrics["val_loss"]
        assert packing is False or len(data.val_set) < 6  # the six examples really share rows
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_a_run_resumed_mid_epoch_under_the_strategy_continues_with_the_next_unseen_batch(tmp_path):
    """MegatronBridgeStrategy's Lightning checkpoint carries the data position: the resumed run sees
    exactly the batches the uninterrupted run saw after the checkpoint, with bitwise the same losses."""
    import lightning.pytorch as pl

    from lightning_bridge import CausalLMModule, MegatronBridgeStrategy
    from lightning_bridge.builtin import tiny_llama

    class Seen(pl.Callback):
        def __init__(self):
            self.batches, self.losses = [], []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.batches.append(batch["input_ids"].clone())
            self.losses.append(float(trainer.callback_metrics["train_loss"]))

    def fit(ckpt_path=None):
        seen = Seen()
        saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[seen, saver],
                             strategy=MegatronBridgeStrategy(str(tiny_llama())))
        data = SFTDataModule(tokenizer=str(tiny_llama()), max_length=64, batch_size=4, seed=3)
        trainer.fit(CausalLMModule(learning_rate=1e-3), datamodule=data, ckpt_path=ckpt_path)
        return seen

    full = fit()
    step_two = next(p for p in (tmp_path / "ckpt").iterdir() if "step=2" in p.name)
    resumed = fit(ckpt_path=str(step_two))
    assert len(full.batches) == 5 and len(resumed.batches) == 3
    for ours, theirs in zip(resumed.batches, full.batches[2:]):
        assert torch.equal(ours, theirs)
    assert resumed.losses == full.losses[2:]
