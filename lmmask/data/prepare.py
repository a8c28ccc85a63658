"""Chat JSONL (or plain-text JSONL) -> role-tagged tokens + loss masks -> shards.

Input, one JSON object per line:
  chat:  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  text:  {"text": "..."}

Tokenizer: the byte-level BPE of lmmask/data/tokenizer.py trained on the
training text (never downloaded), saved as ``tokenizer.json`` next to the shards
(the one shard format, lmmask/data/shards.py). Its special tokens have fixed
ids: ``<pad>=0 <bos>=1 <eos>=2 <|system|>=3 <|user|>=4 <|assistant|>=5 <|end|>=6``.
Each message's content is encoded on its own (no BPE merge crosses a turn), and
content that spells a special token is refused, so a role tag can only come
from the structure of the conversation.

A conversation becomes::

    <bos> [<|system|> sys... <|end|>] <|user|> u... <|end|> <|assistant|> a... <|end|> ...

Loss-mask rules (1 = this token counts as a target):
  * 1 on assistant content tokens and on the assistant's closing ``<|end|>`` (the
    model must learn to stop);
  * 0 on ``<bos>``, on system and user turns (tags, content and ``<|end|>``) and on
    the OPENING ``<|assistant|>`` tag: including it teaches the model to emit role
    tags itself (the model then learns to emit nothing but special tokens);
  * every assistant turn of a multi-turn conversation is masked in this way.
Plain text becomes ``<bos> text <eos>`` with a mask of all ones (pre-training).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings

from lmmask.data import shards, synthetic_chat, tokenizer
from lmmask.data.tokenizer import Tokenizer

PAD, BOS, EOS = tokenizer.TEXT_SPECIALS
ROLE_TAGS = tokenizer.CHAT_ROLE_TAGS
END = tokenizer.CHAT_END
SPECIAL_TOKENS = tokenizer.CHAT_SPECIALS
FORMATS = ("chat", "text")


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
  """The chat tokenizer: a byte-level BPE trained on ``texts`` with SPECIAL_TOKENS at
  ids 0..6."""
  return Tokenizer.chat(tokenizer.train_bpe(texts, vocab_size, SPECIAL_TOKENS,
                                            field="data.vocab_size"))


# ---------------------------------------------------------------------------
# Conversations -> tokens + mask.

def check_conversation(obj, where: str) -> list[dict]:
  """The messages of one chat JSONL record, or a ValueError saying what is wrong."""
  if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
    raise ValueError(f"{where}: expected an object {{\"messages\": [...]}}, got "
                     f"{str(obj)[:80]!r}")
  msgs = obj["messages"]
  if not msgs:
    raise ValueError(f"{where}: 'messages' is empty")
  for j, m in enumerate(msgs):
    if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m \
        or "content" not in m:
      raise ValueError(f"{where}: message {j} must be {{\"role\": ..., \"content\": ...}}, "
                       f"got {str(m)[:80]!r}")
    if m["role"] not in ROLE_TAGS:
      raise ValueError(f"{where}: message {j} has role {m['role']!r}; valid roles: "
                       f"{', '.join(ROLE_TAGS)}")
    if not isinstance(m["content"], str) or not m["content"].strip():
      raise ValueError(f"{where}: message {j} ({m['role']}) has empty or non-string content")
    if m["role"] == "system" and j != 0:
      raise ValueError(f"{where}: a system message may only come first (found at {j})")
  if not any(m["role"] == "assistant" for m in msgs):
    raise ValueError(f"{where}: no assistant turn, so nothing to learn from; drop the line")
  return msgs


def encode_conversation(tok: Tokenizer, messages, *, where: str = "conversation"):
  """(ids, mask) lists for one conversation, by the rules in the module docstring."""
  ids, mask = [tok.bos_id], [0]
  for j, m in enumerate(messages):
    content = tok.encode_text(m["content"], where=f"{where} message {j}")
    target = 1 if m["role"] == "assistant" else 0
    ids += [tok.role_id[m["role"]], *content, tok.end_id]
    mask += [0] + [target] * len(content) + [target]
  return ids, mask


def encode_plain_text(tok: Tokenizer, text: str, *, where: str = "text"):
  content = tok.encode_text(text, where=where)
  ids = [tok.bos_id, *content, tok.eos_id]
  return ids, [1] * len(ids)


def read_jsonl(path: str, fmt: str) -> list:
  """Records of a chat or text JSONL file, validated line by line."""
  if fmt not in FORMATS:
    raise ValueError(f"prepare.format must be one of {FORMATS}, got {fmt!r}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"input file {path} does not exist")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
      if fmt == "chat":
        out.append((where, check_conversation(obj, where)))
      else:
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) \
            or not obj["text"].strip():
          raise ValueError(f"{where}: expected {{\"text\": \"...\"}} with non-empty text")
        out.append((where, obj["text"]))
  if not out:
    raise ValueError(f"{path} holds no records")
  return out


def _texts(records, fmt):
  for _, r in records:
    if fmt == "chat":
      yield from (m["content"] for m in r)
    else:
      yield r


def encode_records(tok, records, fmt):
  enc = encode_conversation if fmt == "chat" else encode_plain_text
  return [enc(tok, r, where=w) for w, r in records]


# ---------------------------------------------------------------------------
# The entry point (launch.py --mode=prepare).

def _inputs(config) -> dict:
  """split -> input JSONL path, writing the embedded synthetic set first if asked."""
  p, d = config.prepare, config.data
  if p.source == "synthetic":
    src = os.path.join(os.path.abspath(d.path) + "_source")
    make = synthetic_chat.chat_split if p.format == "chat" else synthetic_chat.text_split
    return {d.train_split: synthetic_chat.write_jsonl(
                os.path.join(src, f"{d.train_split}.jsonl"),
                make(p.num_train, p.synthetic_seed, "train")),
            d.val_split: synthetic_chat.write_jsonl(
                os.path.join(src, f"{d.val_split}.jsonl"),
                make(p.num_val, p.synthetic_seed, "val"))}
  if p.source == "jsonl":
    if not p.train_file or not p.val_file:
      raise ValueError("prepare.source='jsonl' needs prepare.train_file and prepare.val_file")
    return {d.train_split: p.train_file, d.val_split: p.val_file}
  raise ValueError(f"prepare.source must be 'synthetic' or 'jsonl', got {p.source!r}")


def prepare(config) -> dict:
  """Write the dataset at config.data.path from config.prepare; returns its meta."""
  p, d = config.prepare, config.data
  if p.format not in FORMATS:
    raise ValueError(f"prepare.format must be one of {FORMATS}, got {p.format!r}")
  if not d.path:
    raise ValueError("config.data.path is empty: where should the dataset go?")
  if os.path.exists(d.path) and not p.overwrite:
    raise FileExistsError(f"{d.path} already exists; delete it, choose another data.path, "
                          f"or set prepare.overwrite=True")
  records = {s: read_jsonl(f, p.format) for s, f in _inputs(config).items()}
  if d.tokenizer:
    tok = Tokenizer.load_chat(d.tokenizer)
  else:
    tok = train_tokenizer(_texts(records[d.train_split], p.format), d.vocab_size)
  max_tokens = p.max_tokens or d.length
  splits, dropped = {}, {}
  for s, recs in records.items():
    encoded = encode_records(tok, recs, p.format)
    keep = [e for e in encoded if len(e[0]) <= max_tokens]
    dropped[s] = len(encoded) - len(keep)
    if not keep:
      raise ValueError(f"every {s} record is longer than {max_tokens} tokens; raise "
                       f"prepare.max_tokens / data.length")
    if dropped[s]:
      warnings.warn(f"{s}: dropped {dropped[s]} of {len(encoded)} records longer than "
                    f"{max_tokens} tokens (prepare.max_tokens)")
    splits[s] = ([e[0] for e in keep], [e[1] for e in keep])
  with tempfile.TemporaryDirectory() as tmp:
    tok_path = os.path.join(tmp, shards.TOKENIZER_FILE)
    tok.save(tok_path)
    meta = shards.write_dataset(
        d.path, splits, vocab_size=tok.vocab_size, pad_id=tok.pad_id, kind=p.format,
        tokenizer_file=tok_path, shard_tokens=d.shard_tokens, overwrite=p.overwrite,
        extra={"special_tokens": list(SPECIAL_TOKENS), "dropped_too_long": dropped,
               "max_tokens": max_tokens, "source": p.source,
               "tokenizer_from": d.tokenizer or None})
  return meta
