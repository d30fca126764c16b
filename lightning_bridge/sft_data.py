"""Fine-tuning data from the Hugging Face ecosystem: chat, prompt/completion or text, loss on answers only.

``SFTDataModule`` reads a dataset with the ``datasets`` library (a local JSONL, JSON, Parquet, Arrow,
CSV or text file or folder, a ``datasets.Dataset``, or a Hub id through the datasets cache),
tokenizes it once with the model's tokenizer and chat template (``Dataset.map``: a progress bar,
``num_proc`` processes, cached by ``datasets``), and batches it for :class:`CausalLMModule`.

Batches (per data-parallel replica):

- unpacked: ``input_ids``, ``labels``, ``attention_mask`` [batch, longest], right-padded;
- packed (``packing=True``): ``input_ids``, ``labels``, ``position_ids``, ``attention_mask``
  [batch, max_length]: several examples per row, ``position_ids`` restarting at 0 at each example
  (the strategy attends only within an example and restarts rotary positions there), padding at
  the end (``attention_mask`` 0, positions counting on from the last example).

``labels`` follow transformers: the token itself where it counts, -100 where it does not. Only
assistant turns (chat; from the turn's first token to its end-of-turn token), the completion
(prompt/completion) or every token (text) count. In a packed row the first token of each example is
-100, so no position learns to predict the next example from the previous one.
"""

from __future__ import annotations

import bisect
import collections
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_bridge.module import IGNORE_INDEX
from lightning_bridge.sampling import ResumableDataLoader, ResumableSampler

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv",
                 ".txt": "text"}
_KEPT = ("ok", "truncated")  # tokenization outcomes that stay in the set


def load_source(dataset: str | os.PathLike | datasets.Dataset, split: str = "train", name: str | None = None,
                cache_dir: str | None = None) -> datasets.Dataset:
    """A ``datasets.Dataset`` from a Dataset, a local file or folder, or a Hub id (via the datasets cache).

    Files are read by their suffix (``.jsonl``/``.json``, ``.parquet``, ``.arrow``, ``.csv``, ``.txt``:
    one ``text`` per paragraph); a folder written by ``Dataset.save_to_disk`` is loaded as such.
    A Hub id is read through the datasets cache: offline (``HF_HUB_OFFLINE=1``) once cached.
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        return _split_of(dataset, split, "the DatasetDict")
    if isinstance(dataset, datasets.Dataset):
        return dataset
    path = Path(dataset).expanduser()
    if path.is_file():
        loader = _FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise ValueError(f"{path} has an unknown suffix {path.suffix!r}: use one of "
                             f"{', '.join(_FILE_LOADERS)}, or a folder of such files.")
        if path.stat().st_size == 0:
            raise ValueError(f"The dataset has no examples: {path} is empty.")
        extra = {"sample_by": "paragraph"} if loader == "text" else {}
        return datasets.load_dataset(loader, data_files=str(path), split="train", cache_dir=cache_dir, **extra)
    if path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return _split_of(datasets.load_from_disk(str(path)), split, str(path))
    if not path.exists() and (str(dataset).startswith((".", "/", "~")) or path.suffix.lower() in _FILE_LOADERS):
        raise FileNotFoundError(f"dataset={str(dataset)!r} does not exist. Pass a local file or folder, a Hub "
                                "dataset id, or leave it unset for the built-in chat set.")
    loaded = datasets.load_dataset(str(dataset), name=name, cache_dir=cache_dir)  # a folder of files, or a Hub id
    return _split_of(loaded, split, str(dataset))


def _split_of(splits: Any, split: str, what: str) -> datasets.Dataset:
    if split not in splits:
        raise ValueError(f"{what} has no split {split!r}; it has {sorted(splits)}. Set split= to one of them.")
    return splits[split]


def data_format(columns: list[str], messages: str = "messages", prompt: str = "prompt",
                completion: str = "completion", text: str = "text") -> str:
    """Which columns to read: "messages" (chat), "prompt_completion", or "text", first found in that order."""
    if messages in columns:
        return "messages"
    if prompt in columns and completion in columns:
        return "prompt_completion"
    if text in columns:
        return "text"
    raise ValueError(f"The dataset has columns {columns}; SFTDataModule reads a {messages!r} column (chat: a "
                     f"list of {{role, content}}), {prompt!r} and {completion!r} columns, or a {text!r} column. "
                     "Rename a column, or name yours with messages_column=, prompt_column=/completion_column= "
                     "or text_column=.")


# --- tokenization ---------------------------------------------------------------------------------
def chat_tokens(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None,
                count_from: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation rendered with the chat template; only assistant turns
    from message ``count_from`` on are labelled.

    Each assistant turn is found by rendering the conversation up to it (with the generation prompt)
    and up to its end: the text between is the turn (content and end-of-turn marker). The full
    conversation is tokenized once; a token counts when it starts inside a turn, so the spans do not
    depend on how the tokenizer merges across turn boundaries.
    """
    def render(upto: int, generation_prompt: bool) -> str:
        if upto == 0 and generation_prompt is False:
            return ""
        return tokenizer.apply_chat_template(messages[:upto], chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(len(messages), False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index < count_from:
            continue
        start, end = render(index, True) if index else "", render(index + 1, False)
        if not (end.startswith(start) and text.startswith(end)):
            raise ValueError(f"The chat template does not render conversation turns as prefixes of the whole "
                             f"conversation (it changes earlier turns at message {index}), so the assistant "
                             "tokens cannot be found. Pass a chat_template= that renders each turn the same way "
                             "whatever follows it.")
        spans.append((len(start), len(end)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [begin for begin, _ in encoded["offset_mapping"]]
    ids = list(encoded["input_ids"])
    labels = [token if any(lo <= at < hi for lo, hi in spans) else IGNORE_INDEX for token, at in zip(ids, starts)]
    return ids, labels


def tokenize_example(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, form: str,
                     columns: dict[str, str], chat_template: str | None, max_length: int,
                     overlong: str) -> dict[str, Any]:
    """One example -> ``input_ids``, ``labels``, ``length`` and ``status`` (ok, truncated, too_long, no_target)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if form == "messages":
        ids, labels = chat_tokens(example[columns["messages"]], tokenizer, chat_template)
    elif form == "text":
        ids = tokenizer(example[columns["text"]])["input_ids"]
        ids = ids + eos if ids[-1:] != eos else ids
        labels = list(ids)
    else:
        prompt, completion = example[columns["prompt"]], example[columns["completion"]]
        if isinstance(prompt, list):  # conversational: lists of messages
            ids, labels = chat_tokens(prompt + completion, tokenizer, chat_template, count_from=len(prompt))
        else:
            head = tokenizer(prompt)["input_ids"]
            tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
            ids, labels = head + tail, [IGNORE_INDEX] * len(head) + tail
    status = "ok"
    if len(ids) > max_length:
        status = "too_long" if overlong == "drop" else "truncated"
        ids, labels = ids[:max_length], labels[:max_length]
    if status != "too_long" and all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never a target
        status = "no_target"
    return {"input_ids": ids, "labels": labels, "length": len(ids), "status": status}


def tokenize(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, chat_template: str | None = None,
             max_length: int = 512, overlong: str = "truncate", num_proc: int | None = None,
             columns: dict[str, str] | None = None) -> datasets.Dataset:
    """Tokenize (``Dataset.map``, cached by datasets), drop what cannot train, and log what was done."""
    columns = {"messages": "messages", "prompt": "prompt", "completion": "completion", "text": "text",
               **(columns or {})}
    if len(dataset) == 0:
        raise ValueError("The dataset has no examples. Check the path, split= and name=.")
    form = data_format(dataset.column_names, **columns)
    if form == "messages" or (form == "prompt_completion" and isinstance(dataset[0][columns["prompt"]], list)):
        chat_template = chat_template or tokenizer.chat_template
        if not chat_template:
            raise ValueError(f"The tokenizer ({tokenizer.name_or_path or type(tokenizer).__name__}) has no chat "
                             f"template, so the {form!r} conversations cannot be rendered. Pass one as "
                             "chat_template= (a Jinja string or a .jinja file), e.g. the template of the instruct "
                             "model this one was tuned from, or lightning_bridge.builtin.CHAT_TEMPLATE.")
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer; SFTDataModule needs a fast one "
                         "(token offsets): load it with AutoTokenizer.from_pretrained(..., use_fast=True).")
    tokenized = dataset.map(
        tokenize_example, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing",
        fn_kwargs=dict(tokenizer=tokenizer, form=form, columns=columns, chat_template=chat_template,
                       max_length=max_length, overlong=overlong),
    )
    outcomes = collections.Counter(tokenized["status"])
    kept = tokenized.filter(lambda status: status in _KEPT, input_columns="status", desc="Dropping")
    logger.info("tokenized %d examples (%s): %d kept, %d truncated to max_length=%d, %d dropped as longer than "
                "max_length, %d dropped with no token to learn from", len(dataset), form, len(kept),
                outcomes["truncated"], max_length, outcomes["too_long"], outcomes["no_target"])
    if len(kept) == 0:
        raise ValueError(f"No example is left to train on: of {len(dataset)}, {outcomes['too_long']} are longer than "
                         f"max_length={max_length} (overlong='drop') and {outcomes['no_target']} have no "
                         "assistant/completion token within it. Raise max_length or use overlong='truncate'.")
    return kept.remove_columns("status")


# --- packing and batching ------------------------------------------------------------------------
def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Example indices grouped into rows of at most ``max_length`` tokens (best-fit decreasing).

    Deterministic; the longest examples are placed first, each into the fullest row it fits.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[index], -1))
        if at == len(free):
            rows.append([index])
            bisect.insort(free, (max_length - lengths[index], len(rows) - 1))
        else:
            space, row = free.pop(at)
            rows[row].append(index)
            bisect.insort(free, (space - lengths[index], row))
    return rows


class PackedSequences(Dataset):
    """Rows of ``max_length`` tokens, each several tokenized examples (see the module docstring)."""

    def __init__(self, examples: datasets.Dataset, max_length: int, pad_token_id: int) -> None:
        self.examples, self.max_length, self.pad_token_id = examples, max_length, pad_token_id
        self.rows = pack(examples["length"], max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for example in self.examples.select(self.rows[index]):
            ids += example["input_ids"]
            labels += [IGNORE_INDEX] + example["labels"][1:]
            positions += range(len(example["input_ids"]))
        real, pad = len(ids), self.max_length - len(ids)
        return {
            "input_ids": torch.tensor(ids + [self.pad_token_id] * pad),
            "labels": torch.tensor(labels + [IGNORE_INDEX] * pad),
            "position_ids": torch.tensor(positions + list(range(positions[-1] + 1, positions[-1] + 1 + pad))),
            "attention_mask": torch.tensor([1] * real + [0] * pad),
        }


class Sequences(Dataset):
    """One tokenized example per item (``input_ids``, ``labels`` as tensors); :class:`PadToLongest` batches them."""

    def __init__(self, examples: datasets.Dataset) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        return {"input_ids": torch.tensor(example["input_ids"]), "labels": torch.tensor(example["labels"])}


class PadToLongest:
    """Collate: right-pad to the longest sequence (rounded up to ``pad_to_multiple_of``); ``attention_mask`` 0 on padding."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_token_id, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        longest = -(-longest // self.multiple) * self.multiple
        batch = {"input_ids": torch.full((len(items), longest), self.pad_token_id),
                 "labels": torch.full((len(items), longest), IGNORE_INDEX),
                 "attention_mask": torch.zeros(len(items), longest, dtype=torch.long)}
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            batch["input_ids"][row, :n], batch["labels"][row, :n] = item["input_ids"], item["labels"]
            batch["attention_mask"][row, :n] = 1
        return batch


# --- the data module -----------------------------------------------------------------------------
class SFTDataModule(pl.LightningDataModule):
    """Supervised fine-tuning data: a dataset of chats, prompt/completion pairs or texts, loss on answers only.

    ``dataset`` is a local file or folder, a Hub dataset id (read through the datasets cache), a
    ``datasets.Dataset``, or ``None`` for the built-in chat set (a few dozen short conversations,
    rendered with ``lightning_bridge.builtin.CHAT_TEMPLATE`` when the tokenizer has no template).
    Columns are chosen by name: ``messages_column`` (chat), else ``prompt_column`` +
    ``completion_column``, else ``text_column``. ``tokenizer`` is an HF id or folder (``lightning-bridge
    fit`` sets it to the model). ``chat_template`` (a Jinja string or a ``.jinja`` file) replaces
    the tokenizer's.

    Sequences longer than ``max_length`` are truncated or dropped (``overlong``); ``packing`` fills
    rows of ``max_length`` with several examples. The last ``val_examples`` examples are held out
    for validation. ``batch_size`` is per data-parallel replica; each replica reads its share of a
    permutation drawn from ``seed`` and the epoch, and a run resumed from a Lightning checkpoint
    continues with the next unseen batch (:mod:`lightning_bridge.sampling`).
    """

    def __init__(
        self,
        dataset: str | None = None,
        tokenizer: str | None = None,
        *,
        split: str = "train",
        name: str | None = None,
        messages_column: str = "messages",
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        text_column: str = "text",
        chat_template: str | None = None,
        max_length: int = 512,
        overlong: Literal["truncate", "drop"] = "truncate",
        packing: bool = False,
        batch_size: int = 8,
        val_examples: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        pad_to_multiple_of: int = 8,
        num_proc: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if max_length < 2 or batch_size < 1 or val_examples < 0 or pad_to_multiple_of < 1:
            raise ValueError(f"SFTDataModule needs max_length >= 2, batch_size >= 1, val_examples >= 0 and "
                             f"pad_to_multiple_of >= 1; got max_length={max_length}, batch_size={batch_size}, "
                             f"val_examples={val_examples}, pad_to_multiple_of={pad_to_multiple_of}.")
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong={overlong!r}: use 'truncate' or 'drop'.")
        self.dataset, self.tokenizer_source, self.split, self.name = dataset, tokenizer, split, name
        self.columns = {"messages": messages_column, "prompt": prompt_column, "completion": completion_column,
                        "text": text_column}
        self.chat_template, self.max_length, self.overlong, self.packing = chat_template, max_length, overlong, packing
        self.batch_size, self.val_examples, self.seed, self.shuffle = batch_size, val_examples, seed, shuffle
        self.pad_to_multiple_of, self.num_proc, self.num_workers = pad_to_multiple_of, num_proc, num_workers
        self.cache_dir = cache_dir
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.pad_token_id = 0

    def prepare_data(self) -> None:
        """Tokenize once per node, filling the datasets cache that :meth:`setup` then reads on every rank."""
        self._tokenized()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        examples = self._tokenized()
        split = len(examples) - self.val_examples
        if split <= 0:
            raise ValueError(f"val_examples={self.val_examples} leaves no training data: the dataset has "
                             f"{len(examples)} usable examples. Lower val_examples.")
        self.train_set = self._sequences(examples.select(range(split)))
        if self.val_examples:
            self.val_set = self._sequences(examples.select(range(split, len(examples))))

    def train_dataloader(self) -> ResumableDataLoader:
        replicas, rank = self._data_parallel()
        unit = "packed rows" if self.packing else "examples"
        if len(self.train_set) < self.batch_size * replicas:
            raise ValueError(f"The training set has {len(self.train_set)} {unit}, fewer than one global batch "
                             f"(batch_size={self.batch_size} x {replicas} data-parallel replicas). Lower batch_size "
                             "or max_length, or use more data.")
        sampler = ResumableSampler(self.train_set, num_replicas=replicas, rank=rank, shuffle=self.shuffle,
                                   seed=self.seed)
        return ResumableDataLoader(self.train_set, sampler, batch_size=self.batch_size,
                                   collate_fn=self._collate(), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        replicas, rank = self._data_parallel()
        if len(self.val_set) < self.batch_size * replicas:
            raise ValueError(f"val_examples={self.val_examples} give {len(self.val_set)} validation sequences, fewer "
                             f"than one global batch (batch_size={self.batch_size} x {replicas} data-parallel "
                             "replicas), so validation would get no batches. Set val_examples to 0 or raise it.")
        sampler = ResumableSampler(self.val_set, num_replicas=replicas, rank=rank, shuffle=False)
        return DataLoader(self.val_set, sampler=sampler, batch_size=self.batch_size, drop_last=True,
                          collate_fn=self._collate(), num_workers=self.num_workers)

    def _tokenized(self) -> datasets.Dataset:
        from transformers import AutoTokenizer

        from lightning_bridge.builtin import CHAT_TEMPLATE, chat_set, tiny_llama

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source or str(tiny_llama()))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        template = self.chat_template
        if template is not None and template.endswith(".jinja"):
            template = Path(template).expanduser().read_text()
        if self.dataset is None and template is None and not tokenizer.chat_template:
            template = CHAT_TEMPLATE
        source = load_source(self.dataset if self.dataset is not None else chat_set(), split=self.split,
                             name=self.name, cache_dir=self.cache_dir)
        return tokenize(source, tokenizer, chat_template=template, max_length=self.max_length,
                        overlong=self.overlong, num_proc=self.num_proc, columns=self.columns)

    def _sequences(self, examples: datasets.Dataset) -> Dataset:
        if self.packing:
            return PackedSequences(examples, self.max_length, self.pad_token_id)
        return Sequences(examples)

    def _collate(self) -> Any:
        return None if self.packing else PadToLongest(self.pad_token_id, self.pad_to_multiple_of)

    def _data_parallel(self) -> tuple[int, int]:
        """(replicas, rank) of data parallelism: the strategy's sampler arguments, or (1, 0)."""
        strategy = getattr(self.trainer, "strategy", None) if self.trainer is not None else None
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        return kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
