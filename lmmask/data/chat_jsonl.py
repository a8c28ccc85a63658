"""Chat JSONL for a pretrained model: `data.corpus=shards` with data.path a .jsonl file.

  python launch.py --config=configs/chat.py:sft --config.train.init_from=IMPORTED \
      --config.data.path=chats.jsonl --workdir=W

Each line is {"messages": [{"role", "content"}, ...]}, checked line by line
(`prepare.check_conversation`). The tokenizer and chat template are the
pretrained model's own: the tokenizer.json saved in the workdir, or (for a new
fine-tuning run) in `train.init_from`'s workdir, which is then copied into the
workdir so the fine-tuned model carries it (for generation and export). Ids and
SFT masks come from `chat_template.encode_chat` (the assistant content and its
end-of-turn token). Documents are split into train/val by data.val_fraction and
data.split_seed and written once as shards (the one format, data/shards.py)
into <workdir>/data/chat-<fingerprint>: the fingerprint covers the JSONL, the
tokenizer, the template and the split settings, so other data never reuses them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import numpy as np

from lmmask.data import hf_tokenizer, prepare, pretrained, shards
from lmmask.data.tokenizer import sha256_file

TOKENIZER_FILES = (hf_tokenizer.TOKENIZER_FILE, hf_tokenizer.TOKENIZER_CONFIG_FILE,
                   "chat_template.jinja")


def is_jsonl(path: str) -> bool:
  return isinstance(path, str) and path.endswith(".jsonl")


def tokenizer_dir(config, workdir: str | None) -> str:
  """Where the pretrained tokenizer lives: the workdir, else train.init_from."""
  for d in (workdir, config.train.init_from):
    if d and os.path.exists(os.path.join(d, hf_tokenizer.TOKENIZER_FILE)):
      return d
  raise ValueError(
      f"data.path={config.data.path} is a chat JSONL, which is tokenized with a pretrained "
      f"model's tokenizer and chat template, but neither the workdir ({workdir}) nor "
      f"train.init_from ({config.train.init_from or 'unset'}) holds a tokenizer.json. Import "
      f"a model first (launch.py --mode=import --source=... --workdir=BASE) and set "
      f"--config.train.init_from=BASE, or prepare lmmask's own chat shards with --mode=prepare")


def _copy_tokenizer(src: str, dst: str) -> None:
  """The base's tokenizer files into a fine-tuning workdir (it then carries them)."""
  os.makedirs(dst, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)) and not os.path.exists(os.path.join(dst, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def read_conversations(path: str) -> list[tuple[str, list]]:
  """(where, messages) of every line, or a ValueError naming the line."""
  return prepare.read_jsonl(path, "chat")


def encode(tok, records, max_tokens: int):
  """(docs, masks) of the records; too-long ones dropped with a warning."""
  docs, masks, dropped = [], [], 0
  for where, msgs in records:
    try:
      ids, mask = tok.encode_chat(msgs)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: {e}") from None
    if len(ids) > max_tokens:
      dropped += 1
      continue
    docs.append(ids)
    masks.append(mask)
  if dropped:
    warnings.warn(f"dropped {dropped} of {len(records)} conversations longer than "
                  f"{max_tokens} tokens (data.length / prepare.max_tokens)")
  return docs, masks


def _fingerprint(config, tok_dir: str, tok, vocab: int) -> str:
  d = config.data
  key = {"jsonl_sha256": sha256_file(d.path),
         "tokenizer_sha256": sha256_file(os.path.join(tok_dir, hf_tokenizer.TOKENIZER_FILE)),
         "template": tok.chat_template, "pad_token": tok.pad_token, "vocab_size": vocab,
         "max_tokens": config.prepare.max_tokens or d.length, "val_fraction": d.val_fraction,
         "split_seed": d.split_seed, "train_split": d.train_split, "val_split": d.val_split}
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def build(config, workdir: str) -> str:
  """The shard directory of config.data.path (written on first use); returns its path."""
  d = config.data
  if not workdir:
    raise ValueError(f"data.path={d.path} is a chat JSONL: its shards are written into the "
                     f"workdir; pass --workdir")
  if not os.path.isfile(d.path):
    raise FileNotFoundError(f"data.path={d.path} does not exist (a chat JSONL file of "
                            f"{{\"messages\": [...]}} lines)")
  src = tokenizer_dir(config, workdir)
  tok = pretrained.load_tokenizer(src)
  if tok.chat_template is None:
    raise ValueError(f"the tokenizer in {src} has no chat template, so conversations cannot "
                     f"be rendered; add chat_template to its tokenizer_config.json")
  vocab = config.model.vocab_size if config.model.vocab_size > 0 else tok.vocab_size
  if tok.vocab_size > vocab:
    raise ValueError(f"the tokenizer in {src} has {tok.vocab_size} tokens but "
                     f"model.vocab_size={vocab}; fine-tune from the model it came with")
  out = os.path.join(workdir, "data", "chat-" + _fingerprint(config, src, tok, vocab)[:16])
  if os.path.abspath(src) != os.path.abspath(workdir):
    _copy_tokenizer(src, workdir)
  if os.path.exists(os.path.join(out, shards.META_FILE)):
    return out
  records = read_conversations(d.path)
  docs, masks = encode(tok, records, config.prepare.max_tokens or d.length)
  if len(docs) < 2:
    raise ValueError(f"{d.path}: {len(docs)} usable conversation(s); need at least 2 (one "
                     f"for training, one held out)")
  rng = np.random.default_rng(d.split_seed)
  order = rng.permutation(len(docs))
  n_val = min(max(1, int(round(d.val_fraction * len(docs)))), len(docs) - 1)
  val, train = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
  splits = {d.train_split: ([docs[i] for i in train], [masks[i] for i in train]),
            d.val_split: ([docs[i] for i in val], [masks[i] for i in val])}
  # The base's own files, byte for byte: train.init_from compares tokenizer_sha256.
  shards.write_dataset(
      out, splits, vocab_size=vocab, pad_id=tok.pad_id, kind="chat",
      tokenizer_file=os.path.join(src, hf_tokenizer.TOKENIZER_FILE),
      extra={"hf_tokenizer": True, "pad_token": tok.pad_token, "source": "jsonl",
             "jsonl": os.path.abspath(d.path), "tokenizer_from": os.path.abspath(src)})
  for name in TOKENIZER_FILES[1:]:
    if os.path.exists(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
  return out


def source(config, workdir: str | None = None):
  """The shards DataSource of the JSONL's shards (built on first use)."""
  path = build(config, workdir)
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.path = path
  return shards.source(cfg, workdir)
