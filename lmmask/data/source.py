"""What the train loop needs from any corpus (verbs, text, ...)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lmmask.batching import Batch


@dataclasses.dataclass
class DataSource:
  vocab_size: int                       # the model's vocabulary size
  pad_id: int                           # filler id (masks never depend on it for text)
  train_batch: Callable[[int], Batch]   # step -> the batch of that step (pure in step)
  eval_sets: Callable[[], dict]         # () -> {name: [Batch, ...]}, each covered once
  info: Any = None                      # the corpus object (vocab, tokenizer, ...)
