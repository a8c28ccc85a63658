"""What the train loop and the evaluators need from any corpus (verbs, text, shards).

Each corpus module builds one with its `source(config, workdir)`; the registry
(lmmask/data/registry.py) picks the module from config.data.corpus.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

from lmmask.batching import Batch


class TokenizerLike(Protocol):
  """What every corpus's `DataSource.tokenizer` offers (verbs: its word vocabulary;
  text and shards: the byte-level BPE of lmmask/data/tokenizer.py)."""
  bos_id: int
  eos_id: int
  pad_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...  # no special tokens added

  def decode(self, ids, skip_special: bool = True) -> str: ...


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
  info: Any = None                      # the corpus object: VerbCorpus for verbs; a dict
                                        # of splits/loaders (and more) for text and shards
