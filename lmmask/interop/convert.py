"""Hugging Face / GGUF checkpoints <-> lmmask workdirs (launch.py --mode=import|export).

  import: a HF model directory or a .gguf file becomes a normal workdir: a complete
    config.json (defaults() with model.* from the checkpoint and the corpus
    "pretrained"), an orbax checkpoint at step 0 with the same tree training writes
    (params + a fresh optimizer state, so it resumes and fine-tunes like any run),
    the tokenizer (tokenizer.json, tokenizer_config.json with the pad chosen at
    import, chat_template.jinja), model.json (family and source config) and
    provenance.json (source path and sha256). Written into a temporary sibling
    renamed into place: an existing workdir is never touched.
  export: a workdir's checkpoint as a HF directory of the family recorded at import
    (following train.init_from back to the import), or for a native lmmask model the
    family its options match exactly (`hf.family_of` refuses naming the option).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil

import jax
import jax.numpy as jnp
from flax import nnx

from lmmask import checkpoint as ckpt
from lmmask import config as config_lib
from lmmask import step as step_lib
from lmmask import workdir as wd
from lmmask.data import hf_tokenizer, pretrained
from lmmask.interop import hf

JINJA_FILE = "chat_template.jinja"


def _sha256(path: str) -> dict:
  """{"sha256": ...} of a file, or of a directory's files (each and together)."""
  def one(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()
  if os.path.isfile(path):
    return {"sha256": one(path)}
  files = {n: one(os.path.join(path, n)) for n in sorted(os.listdir(path))
           if os.path.isfile(os.path.join(path, n))}
  total = hashlib.sha256("".join(f"{n}:{s}\n" for n, s in files.items()).encode()).hexdigest()
  return {"sha256": total, "files_sha256": files}


def config_for(ck: hf.Checkpoint):
  """A complete lmmask config for an imported checkpoint: defaults() with model.*
  from its DecoderConfig and the corpus "pretrained" (its tokenizer, no data)."""
  c = config_lib.defaults()
  c.name = f"import_{ck.family}"
  c.data.corpus = "pretrained"
  c.data.split = ""
  c.data.length = ck.config.max_len
  if ck.tokenizer is not None:
    c.data.pad_token = ck.tokenizer.pad_token
    c.data.bos_token = ck.tokenizer.special_tokens.get("bos_token") or ""
    c.data.eos_token = ck.tokenizer.special_tokens.get("eos_token") or ""
  for f in dataclasses.fields(ck.config):
    if f.name != "attention":  # a speed knob, not the checkpoint's: the config's (auto) stays
      c.model[f.name] = getattr(ck.config, f.name)  # dropout: the import's NO_DROPOUT
  c.eval.max_new_tokens = 64  # generate's default budget: a whole reply in subword tokens
  config_lib.validate(c)
  return c


def import_checkpoint(source: str, workdir: str, *, max_len: int | None = None) -> dict:
  """Write `source` (HF directory or .gguf) as a new workdir; returns its model.json."""
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise FileExistsError(f"workdir {workdir} already exists; import writes a new workdir "
                          f"(choose another --workdir or delete it)")
  wd.check_writable(workdir)
  ck = hf.read(source, max_len=max_len)
  config = config_for(ck)
  tmp = os.path.abspath(workdir).rstrip("/") + ".tmp_import"
  if os.path.exists(tmp):
    raise FileExistsError(f"{tmp} exists (an interrupted import?); delete it")
  os.makedirs(tmp)
  try:
    if ck.tokenizer is not None:
      ck.tokenizer.save(tmp, model_max_length=ck.config.max_len)
      if ck.chat_template:
        with open(os.path.join(tmp, JINJA_FILE), "w", encoding="utf-8") as f:
          f.write(ck.chat_template)
    data = pretrained.source(config, tmp)
    state = step_lib.create_train_state(config, jax.random.PRNGKey(config.seed),
                                        vocab_size=data.vocab_size,
                                        keys_are_prefix=data.keys_are_prefix)
    params = state.params
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, ck.params))
    state = state.replace(params=params, opt_state=state.tx.init(params))
    mngr = ckpt.manager(tmp, ckpt.CKPT_DIR, config.train.keep_checkpoints,
                        barrier_timeout_s=config.distributed.barrier_timeout_s)
    try:
      ckpt.save(mngr, 0, state.checkpoint_tree(),
                {"config": config_lib.to_dict(config), "imported_from": source})
      ckpt.finish(mngr)
    finally:
      mngr.close()
    wd.atomic_write_json(os.path.join(tmp, wd.CONFIG_FILE), config_lib.to_dict(config))
    record = dict(wd.model_record(config, data), family=ck.family,
                  source_config=ck.source_config)
    wd.atomic_write_json(os.path.join(tmp, wd.MODEL_FILE), record)
    prov = dict(wd.provenance(), imported_from={"path": os.path.abspath(source),
                                                "family": ck.family, **_sha256(source)})
    wd.atomic_write_json(os.path.join(tmp, wd.PROVENANCE_FILE), prov)
    if os.path.exists(workdir):
      os.rmdir(workdir)  # empty (checked above)
    os.rename(tmp, workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return record


def recorded_family(workdir: str) -> str | None:
  """The family recorded at import, following train.init_from back to the import."""
  seen = set()
  while workdir and os.path.abspath(workdir) not in seen:
    seen.add(os.path.abspath(workdir))
    path = os.path.join(workdir, wd.MODEL_FILE)
    if not os.path.exists(path):
      return None
    record = wd.read_json(path, "")
    if record.get("family"):
      return record["family"]
    workdir = (record.get("init_from") or {}).get("workdir")
  return None


def export_tokenizer(tok):
  """The HFTokenizer to write next to an exported model, or None (a verbs model)."""
  if tok is None or isinstance(tok, hf_tokenizer.HFTokenizer):
    return tok
  if getattr(tok, "role_id", None):
    return hf_tokenizer.from_chat_tokenizer(tok)
  if hasattr(tok, "tok"):  # lmmask's text BPE: <pad> <bos> <eos>, no template
    special = {"bos_token": tok.tok.id_to_token(tok.bos_id),
               "eos_token": tok.tok.id_to_token(tok.eos_id), "unk_token": None,
               "pad_token": tok.tok.id_to_token(tok.pad_id)}
    return hf_tokenizer.HFTokenizer(tok=tok.tok, special_tokens=special, chat_template=None,
                                    pad_id=tok.pad_id)
  return None


def export_workdir(workdir: str, out: str, *, dtype: str = "float32", step=None,
                   which: str = "latest") -> dict:
  """Write a workdir's checkpoint as a HF directory at `out` (which must not exist)."""
  if os.path.exists(out):
    raise FileExistsError(f"--out={out} already exists; export writes a new directory "
                          f"(delete it or choose another path)")
  if dtype not in hf.DTYPES:
    raise ValueError(f"--export_dtype must be one of {', '.join(hf.DTYPES)}, got {dtype!r}")
  config = wd.load_config(workdir)
  data = None
  if os.path.exists(os.path.join(workdir, hf_tokenizer.TOKENIZER_FILE)):
    # An imported or fine-tuned-from-import workdir carries its tokenizer: no data needed.
    data = pretrained.source(config, workdir)
  config, data, state, restored = wd.restore_state(workdir, which, step, config=config,
                                                   data=data)
  cfg = config_lib.decoder_config(config, data.vocab_size)
  family = hf.family_of(cfg)
  recorded = recorded_family(workdir)
  if recorded is not None and recorded != family:
    raise ValueError(f"the workdir was imported as {recorded}, but its options now match "
                     f"{family}; refusing an export that would change the model family")
  params = jax.tree.map(lambda x: jax.device_get(x), nnx.to_pure_dict(state.params))
  tok = export_tokenizer(data.tokenizer)
  hf.export(out, cfg, params, tokenizer=tok, dtype=dtype)
  return {"family": family, "step": int(restored), "out": out, "dtype": dtype,
          "tokenizer": tok is not None}
