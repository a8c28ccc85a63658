"""`train.init_from`: start a run (e.g. SFT) from a base run's parameters.

* The architecture is the base run's: every field in `ARCH_FIELDS` of the new
  config must equal the base run's saved config.json (vocab_size is compared after
  resolution, i.e. the base model's real vocabulary against the new data's), and
  the two datasets must come from the same tokenizer. Any difference is refused
  with a ValueError naming the field -- before anything is written.
* Training parameters (lr, schedule, dropout, batch size, use_loss_mask, steps,
  seed) come from the new config.
* Parameters are restored from the base run's latest checkpoint; the optimizer
  state is fresh (`tx.init`) and the step counter starts at 0.
* The new run's config.json records ``train.init_from``, and its model.json the
  base workdir and checkpoint step actually used.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax

from lmmask import checkpoint as ckpt

ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len", "dtype",
               "gelu_approximate", "init_std", "causal")
MODEL_FILE = "model.json"


def data_identity(info) -> dict:
  """A JSON-able identity of a DataSource's `info` (a dict, or a corpus object)."""
  if isinstance(info, dict):
    return info
  return {"kind": type(info).__name__,
          "tokenizer_sha256": getattr(info, "tokenizer_sha256", None)}


def model_record(config, vocab_size: int, data_info, init_info=None) -> dict:
  """What a workdir's model.json holds: the resolved architecture and data identity."""
  from lmmask.train import decoder_config
  return {"decoder": dataclasses.asdict(decoder_config(config, vocab_size)),
          "causal": bool(config.model.causal), "data": data_identity(data_info),
          "init_from": init_info}


def _load_record(base_workdir: str) -> dict:
  path = os.path.join(base_workdir, MODEL_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"train.init_from={base_workdir}: no {MODEL_FILE} there (it is "
                            f"written by every training run); train the base run first")
  with open(path) as f:
    return json.load(f)


def check_compatible(config, workdir: str, vocab_size: int, data_info) -> dict:
  """Validate `config` against the base run in config.train.init_from; returns
  the base run's saved config (dict). Raises ValueError naming the first field
  that differs."""
  base = config.train.init_from
  if os.path.abspath(base) == os.path.abspath(workdir):
    raise ValueError(f"train.init_from={base} is this run's own workdir; point it at the "
                     f"base run's workdir")
  base_cfg = ckpt.load_saved_config(base)
  record = _load_record(base)
  base_model = base_cfg["model"]
  base_vocab = record["decoder"]["vocab_size"]
  if config.model.vocab_size not in (-1, base_vocab) or vocab_size != base_vocab:
    raise ValueError(
        f"model.vocab_size: the base run in {base} has a vocabulary of {base_vocab} tokens, "
        f"this run's data has {vocab_size} (config says {config.model.vocab_size}). Prepare "
        f"the fine-tuning data with the base run's tokenizer (prepare.tokenizer).")
  for field in ARCH_FIELDS:
    if field == "vocab_size":
      continue
    if field not in base_model or base_model[field] != config.model[field]:
      raise ValueError(
          f"model.{field}: the base run in {base} has {base_model.get(field, '<absent>')!r}, "
          f"this config has {config.model[field]!r}. The architecture comes from the base "
          f"run: set --config.model.{field}={base_model.get(field)} or use another base.")
  base_tok = (record.get("data") or {}).get("tokenizer_sha256")
  new_tok = data_identity(data_info).get("tokenizer_sha256")
  if base_tok != new_tok:
    raise ValueError(
        f"data tokenizer (meta.json tokenizer_sha256): the base run was trained on data from "
        f"tokenizer {base_tok}, this data comes from {new_tok}; token ids would mean different "
        f"things. Re-run prepare with prepare.tokenizer=<the base data's tokenizer.json>.")
  return base_cfg


def restore_base_params(config, state, base_cfg: dict, vocab_size: int):
  """`state` with the base run's latest params, a fresh optimizer state and step 0.
  Returns (state, base_step)."""
  from ml_collections import ConfigDict

  from lmmask.train import create_train_state
  base = config.train.init_from
  # The base run's own state gives the exact tree (its optimizer may differ).
  base_state = create_train_state(ConfigDict(base_cfg), jax.random.PRNGKey(0),
                                  vocab_size=vocab_size)
  sub = os.path.join(base, ckpt.CKPT_DIR)
  if not os.path.isdir(sub):
    raise FileNotFoundError(f"train.init_from={base}: no checkpoints in {sub}")
  mngr = ckpt.manager(base, ckpt.CKPT_DIR, base_cfg["train"]["keep_checkpoints"], create=False)
  try:
    step, tree, _ = ckpt.restore(mngr, None, base_state.checkpoint_tree())
  finally:
    mngr.close()
  params = tree["params"]
  return state.replace(params=params, opt_state=state.tx.init(params),
                       step=jax.numpy.zeros_like(state.step)), int(step)
