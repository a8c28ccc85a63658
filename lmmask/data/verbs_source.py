"""The verbs corpus as a DataSource: padded splits, step batches, eval sets.

The corpus itself (forms, vocabulary, held-out splits) is lmmask/data/verbs.py;
this module turns it into what the train loop and the evaluators read.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lmmask.data import packing, pipeline, verbs
from lmmask.data.source import SPLITS, DataSource


class VocabTokenizer:
  """The verbs vocabulary behind the tokenizer interface every corpus offers: text is
  split on whitespace (word tokens) or into characters (char tokens), and every
  token must be in the vocabulary."""

  def __init__(self, vocab: verbs.Vocab):
    self.vocab = vocab
    self.pad_id, self.bos_id, self.eos_id = vocab.pad_id, vocab.bos_id, vocab.eos_id
    self.vocab_size = len(vocab)

  def encode(self, text: str) -> list[int]:
    """Ids of the tokens of `text` (no <bos>/<eos>). A trailing "/" (a prompt such as
    "yo como /") is the separator token at either tokenization."""
    if self.vocab.kind != "word":
      try:
        return self.vocab.encode_prompt(text)[1:]
      except ValueError as e:
        raise ValueError(f"{e}; the corpus is closed (write forms as the corpus does, "
                         f"e.g. 'yo trabajo / I work')") from None
    words = text.split()
    unknown = sorted({w for w in words if w not in self.vocab.tokens})
    if unknown:
      raise ValueError(f"{len(unknown)} word(s) of {text!r} are not in the verbs vocabulary: "
                       f"{unknown[:10]}; the corpus is closed (write forms as the corpus "
                       f"does, e.g. 'yo trabajo / I work', words separated by spaces)")
    return [self.vocab.id(w) for w in words]

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self.vocab.decode(ids, strip_special=skip_special)


class ExampleDocuments:
  """The examples of a verbs split as `source.Documents` (every token may be a target)."""

  def __init__(self, examples):
    self.examples = tuple(examples)

  def __len__(self):
    return len(self.examples)

  def doc_lengths(self) -> np.ndarray:
    return np.asarray([len(e.ids) for e in self.examples], np.int64)

  def doc(self, i: int):
    return np.asarray(self.examples[i].ids, np.int64), None


def corpus(config) -> verbs.VerbCorpus:
  """The VerbCorpus of `config` (forms, vocabulary, held-out split): what the verbs
  evaluator (eval/verbs.py) scores beyond the DataSource contract."""
  d = config.data
  if d.split not in verbs.SPLIT_POLICIES and "random" not in str(d.split):
    raise ValueError(f"config.data.split: unknown split {d.split!r}; valid: "
                     f"{', '.join(verbs.SPLIT_POLICIES)}")
  return verbs.build_corpus(d.split, include_lexicon=d.include_lexicon, tokens=d.tokens)


def splits(config):
  """(VerbCorpus, train Split, val Split), padded to data.length on data.pad_side."""
  d = config.data
  c = corpus(config)
  kw = dict(length=d.length, pad_id=c.vocab.pad_id, pad_side=d.pad_side)
  return c, pipeline.pad_split(c.train, **kw), pipeline.pad_split(c.val, **kw)


def train_batch(config, train_split, step: int, pad_id: int, rows=None):
  """The training batch of `step` (rows=(lo, hi): only those rows): several examples
  per row with data.packing (data/packing.py, first fit), else one padded example
  per row."""
  d = config.data
  if d.packing:
    # First fit packs across rows (a document goes to the first row with room), so a
    # row depends on the whole step's documents: pack them all (cheap: token ids
    # only), keep this process's rows.
    batch, _ = packing.train_batch(train_split, step=step, batch_size=d.batch_size,
                                   seed=config.seed, pad_id=pad_id,
                                   docs_per_row=d.pack_docs_per_row)
    return batch if rows is None else batch.take_rows(*rows)
  return pipeline.train_batch(train_split, step=step, batch_size=d.batch_size,
                              seed=config.seed, pad_id=pad_id, rows=rows)


def eval_sets(config, train_split, val_split, pad_id: int) -> dict:
  bs = config.data.eval_batch_size
  return {
      "train": pipeline.eval_batches(train_split, batch_size=bs, pad_id=pad_id),
      "val": pipeline.eval_batches(val_split, batch_size=bs, pad_id=pad_id),
      "val_english": pipeline.eval_batches(val_split, batch_size=bs, pad_id=pad_id,
                                           english_only=True),
  }


def source(config, workdir: str | None = None) -> DataSource:
  """The verbs DataSource (embedded data: `workdir` is unused)."""
  del workdir
  c, train_split, val_split = splits(config)
  pad_id = c.vocab.pad_id
  # Exactly what model.json has always recorded for this corpus; character tokens
  # say so, so a word-token base run is never fine-tuned with character ids.
  identity = {"kind": type(c).__name__, "tokenizer_sha256": None}
  if config.data.tokens != "word":
    identity["tokens"] = config.data.tokens
  docs = {"train": ExampleDocuments(c.train), "val": ExampleDocuments(c.val)}

  def documents(split: str) -> ExampleDocuments:
    if split not in docs:
      raise ValueError(f"split {split!r}: the verbs corpus has {', '.join(SPLITS)}")
    return docs[split]
  d = config.data
  return DataSource(
      name="verbs", vocab_size=len(c.vocab), pad_id=pad_id,
      train_batch=lambda step, rows=None: train_batch(config, train_split, step, pad_id, rows),
      eval_sets=lambda: eval_sets(config, train_split, val_split, pad_id),
      tokenizer=VocabTokenizer(c.vocab), identity=identity, documents=documents,
      # Unpacked rows are one example each, padded after it on the right.
      keys_are_prefix=d.pad_side == "right" and not d.packing,
      train_eval_whole=True)  # the "train" eval set pads every example, whole, once
