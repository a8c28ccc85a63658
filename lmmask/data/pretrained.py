"""The corpus "pretrained": an imported model's workdir (launch.py --mode=import).

An imported checkpoint comes with a tokenizer and chat template but no data of
its own, so this corpus only gives `restore_state` what it needs to rebuild the
model (the vocabulary size, the pad id and the tokenizer saved in the workdir).
Training on it or evaluating it is refused with the way to give it data: a chat
JSONL through `--config=configs/chat.py:sft --config.data.path=FILE.jsonl`.
"""
from __future__ import annotations

import json
import os

from lmmask.data import hf_tokenizer
from lmmask.data.source import DataSource
from lmmask.data.tokenizer import sha256_file

NO_DATA_HINT = ("an imported model has no data of its own; give it some: "
                "--config=configs/chat.py:sft --config.data.path=FILE.jsonl (a JSONL of "
                "{\"messages\": [...]}) for eval/audit, or fine-tune it with "
                "--config.train.init_from=<this workdir>")


def load_tokenizer(directory: str):
  """The HFTokenizer saved in `directory` (tokenizer.json + tokenizer_config.json),
  or None when there is none. Its pad is the one chosen at import, which
  tokenizer_config.json records (and config.json's data.pad_token repeats), so
  batching, generation and export agree on it."""
  if not os.path.exists(os.path.join(directory, hf_tokenizer.TOKENIZER_FILE)):
    return None
  cfg_file = os.path.join(directory, hf_tokenizer.TOKENIZER_CONFIG_FILE)
  pad = None
  if os.path.exists(cfg_file):
    with open(cfg_file, encoding="utf-8") as f:
      pad = json.load(f).get("pad_token")
  pad = pad.get("content") if isinstance(pad, dict) else pad
  return hf_tokenizer.load_tokenizer_dir(directory, pad_token=pad)


def tokenizer_sha256(directory: str) -> str | None:
  path = os.path.join(directory, hf_tokenizer.TOKENIZER_FILE)
  return sha256_file(path) if os.path.exists(path) else None


def source(config, workdir: str | None = None) -> DataSource:
  """The imported model's vocabulary and tokenizer; no batches."""
  if not workdir:
    raise ValueError("corpus 'pretrained' reads the tokenizer saved in the workdir; pass "
                     "the imported workdir")
  vocab = config.model.vocab_size
  if not isinstance(vocab, int) or vocab < 1:
    raise ValueError(f"corpus 'pretrained' needs config.model.vocab_size (the imported "
                     f"embedding's rows), got {vocab!r}; re-import the model")
  tok = load_tokenizer(workdir)
  pad_id = tok.pad_id if tok is not None else 0

  def refuse(*_):
    raise ValueError(NO_DATA_HINT)
  identity = {"kind": "pretrained", "tokenizer_sha256": tokenizer_sha256(workdir),
              "vocab_size": vocab, "pad_id": pad_id}
  return DataSource(name="pretrained", vocab_size=vocab, pad_id=pad_id, train_batch=refuse,
                    eval_sets=refuse, tokenizer=tok, identity=identity, documents=refuse,
                    keys_are_prefix=False, train_eval_whole=False)
