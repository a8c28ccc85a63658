"""What the train loop and the evaluators need from any corpus (verbs, text, shards).

Each corpus module builds one with its `source(config, workdir)`; the registry
(lmmask/data/registry.py) picks the module from config.data.corpus. The fields
below are the whole contract: the loop and every evaluator read a corpus only
through them, so a new corpus implements them and nothing else
(tests/test_registry.py evaluates a minimal corpus that has nothing more).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import numpy as np

from lmmask.batching import Batch

SPLITS = ("train", "val")  # the split names `DataSource.documents` takes


class TokenizerLike(Protocol):
  """What every corpus's `DataSource.tokenizer` offers (verbs: its word vocabulary;
  text and shards: the byte-level BPE of lmmask/data/tokenizer.py)."""
  bos_id: int
  eos_id: int
  pad_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...  # no special tokens added

  def decode(self, ids, skip_special: bool = True) -> str: ...


class Documents(Protocol):
  """A split's whole documents, in a fixed order (data/shards.py's ShardSplit is one)."""

  def __len__(self) -> int: ...

  def doc_lengths(self) -> np.ndarray: ...  # tokens of every document, without reading them

  def doc(self, i: int) -> tuple[np.ndarray, np.ndarray | None]: ...  # (ids, 0/1 target
                                                                      # mask, or None)


@dataclasses.dataclass
class DataSource:
  name: str                             # the corpus key: "verbs" | "text" | "shards"
  vocab_size: int                       # the model's vocabulary size
  pad_id: int                           # filler id (masks never depend on it for text)
  train_batch: Callable[..., Batch]     # (step, rows=None) -> the batch of that step (pure
                                        # in step); rows=(lo, hi): only those rows of it,
                                        # built alone (each process builds its own rows)
  eval_sets: Callable[[], dict]         # () -> {name: [Batch, ...]}, each covered once
  tokenizer: TokenizerLike              # text <-> ids for prompts and samples
  identity: dict                        # JSON-able; model.json's "data" (init_from compares
                                        # its tokenizer_sha256)
  documents: Callable[[str], Documents]  # split ("train" | "val") -> its whole documents
                                        # (the entropy floor, continuations, chat replies)
  keys_are_prefix: bool                 # every batch row's real tokens are a prefix of it
                                        # (right padding, one document per row): the fused
                                        # attention may take lengths instead of a mask
  train_eval_whole: bool                # eval_sets()["train"] is documents("train"), each
                                        # document whole and once, every target counted: the
                                        # entropy floor then bounds its loss (the leak alarm)
