"""The corpus registry: config.data.corpus -> the module whose `source` builds it.

  verbs   the embedded Spanish/English verb grammar (data/verbs_source.py)
  text    plain-text files, tokenized and sharded into the workdir (data/text.py)
  shards  a token/mask dataset made by --mode=prepare, e.g. chat SFT (data/shards.py),
          or a chat JSONL tokenized with a pretrained model's template (data/chat_jsonl.py)
  pretrained  an imported model's workdir: its tokenizer, no data (data/pretrained.py)
"""
from __future__ import annotations

from lmmask.data import chat_jsonl, corpus, pretrained, shards, text, verbs_source
from lmmask.data import prepare as prepare_lib
from lmmask.data.source import DataSource


def _shards(config, workdir):
  if chat_jsonl.is_jsonl(config.data.path):
    return chat_jsonl.source(config, workdir)
  return shards.source(config, workdir)


_SOURCES = {"verbs": verbs_source.source, "text": text.source, "shards": _shards,
            "pretrained": pretrained.source}
CORPORA = tuple(_SOURCES)


def load(config, workdir: str | None = None) -> DataSource:
  """The DataSource of config.data.corpus. `workdir` is where a corpus that builds
  files (text: tokenizer and shards) keeps them; the others ignore it."""
  name = config.data.corpus
  if name not in _SOURCES:
    raise ValueError(f"config.data.corpus: unknown corpus {name!r}; valid: "
                     f"{', '.join(CORPORA)}")
  return _SOURCES[name](config, workdir)


def prepare(config, workdir: str | None = None) -> dict:
  """--mode=prepare: what training would prepare, without training; returns the meta.json.
  text: the tokenizer and token shards in `workdir` (training there reuses them);
  shards: the dataset at data.path from prepare.* (synthetic or JSONL chat/text)."""
  name = config.data.corpus
  if name == "text":
    if not workdir:
      raise ValueError("corpus 'text' is prepared into a workdir: pass --workdir=W (a "
                       "training run in W then reuses it)")
    return corpus.build(config, workdir, verify=True)
  if name == "shards":
    return prepare_lib.prepare(config)
  raise ValueError(f"corpus {name!r} has nothing to prepare; --mode=prepare applies to the "
                   f"corpora text and shards")
