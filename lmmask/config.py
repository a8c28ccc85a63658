"""Every config field, its default and its comment, in one place.

`defaults()` is the only place a default value is written. Each `configs/*.py`
starts from it and sets only what differs, so every knob (mesh, accumulation,
failure policy, speed and decoder options, evaluation) exists in every
experiment and `--config.<field>=value` works everywhere. Variants go through
the one shared parser `parse_arg`; a saved `config.json` from an older lmmask is
completed by `upgrade` (the only place that knows which fields came later).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
from ml_collections import ConfigDict, config_dict

from lmmask import losses, optim
from lmmask.data import verbs
from lmmask.model import ATTENTION_IMPLS, HONOURS_SEGMENTS, DecoderConfig, resolve_attention

CORPORA = ("verbs", "text", "shards", "pretrained")  # data.corpus values (lmmask/data/registry.py)
NONFINITE_POLICIES = ("stop", "skip")  # train.nonfinite
RESUME_POLICIES = ("auto", "require")  # train.resume
DIRECTIONS = ("es_en", "en_es")        # eval.direction (verbs exact match)


def defaults() -> ConfigDict:
  """The default experiment (the verb-grammar run) with every field lmmask reads."""
  c = ConfigDict()
  c.name = "verbs"                      # experiment name, recorded with results
  c.seed = 0                            # seeds params, dropout and data order

  c.data = d = ConfigDict()
  d.corpus = "verbs"                    # verbs | text | shards (prepared, or chat .jsonl) | pretrained
  # --- every corpus
  d.length = 14                         # every row is padded (or packed) to this many tokens (L)
  d.pad_side = "right"                  # right | left; the loss is identical
  d.batch_size = 32                     # rows per training step
  d.eval_batch_size = 64                # rows per evaluation batch
  d.packing = False                     # several documents per row (segment ids, positions
                                        # restart); verbs and text only
  # --- verbs
  d.split = "verbs"                     # held-out policy: verbs | tense | person (text: documents)
  d.include_lexicon = True              # add "trabajar / work" lines for all 20 verbs to train
  d.tokens = "word"                     # word: whitespace tokens, so held-out verbs' forms are
                                        # never-trained tokens; char: characters and the space
                                        # (" / " one token), so a new verb is known letters
  d.pack_docs_per_row = 2               # verbs packing: documents drawn per row per step
  # --- text and shards
  d.path = ""                           # text: a file, directory or glob; shards: a dataset
  # --- text (data/corpus.py, data/inputs.py) and --mode=prepare
  d.doc_separator = "\n\n"              # documents inside a text file (paragraphs); "" = whole file
  d.text_key = "text"                   # JSONL field / Parquet or Arrow column of the documents
  d.val_fraction = 0.1                  # share of documents held out (by a hash of each one)
  d.split_seed = 0                      # keys that hash: which documents are held out
  d.tokenizer = ""                      # an existing tokenizer.json; "" = train a byte-level BPE
  d.vocab_size = 512                    # BPE vocabulary size when training one (>= 259)
  d.tokenizer_sample_bytes = 100 << 20  # the BPE trains on a hashed sample of this much text
  d.workers = 0                         # preparation processes; 0 = one per core
  d.chunk_bytes = 16 << 20              # input per unit of work (and of resumption)
  d.max_bad_fraction = 0.0              # share of unreadable records tolerated (skipped, counted)
  d.pad_token = "<pad>"                 # special tokens (in a given tokenizer; imported: its pad)
  d.bos_token = "<bos>"
  d.eos_token = "<eos>"
  d.max_eval_batches = 0                # cap on eval batches per split; 0 = the whole split
  d.shard_tokens = 1 << 26              # at most this many tokens per shard file
  # --- shards (chat SFT and prepared pre-training data)
  d.train_split = "train"               # split directory used for training batches
  d.val_split = "val"                   # split directory used for validation
  d.use_loss_mask = False               # True: only mask-1 tokens (assistant turns) are targets
  d.max_eval_docs = 256                 # cap on documents per evaluation set (0 = all)

  c.prepare = p = ConfigDict()          # --mode=prepare: writes data.path
  p.format = "text"                     # chat: role tags + assistant mask; text: all-ones mask
  p.source = "synthetic"                # synthetic: the embedded data set; jsonl: the files below
  p.train_file = ""                     # source=jsonl: training JSONL
  p.val_file = ""                       # source=jsonl: validation JSONL
  p.num_train = 8000                    # synthetic: training records
  p.num_val = 400                       # synthetic: validation records
  p.synthetic_seed = 0                  # synthetic: generator seed
  p.max_tokens = 0                      # drop longer records (0 = data.length)
  p.overwrite = False                   # replace an existing data.path

  c.model = m = ConfigDict()
  m.vocab_size = -1                     # -1: the corpus vocabulary's size (checked if set)
  m.d_model = 64                        # residual width
  m.n_layers = 2                        # transformer blocks
  m.n_heads = 4                         # attention heads (d_model % n_heads == 0)
  m.d_ff = 192                          # MLP hidden width (per branch for swiglu)
  m.max_len = 16                        # position table size (>= data.length - 1; rope: a cap)
  m.dropout = 0.2                       # dropout on embeddings and residual branches (0.1 let
                                        # the default run overfit: val loss up 30% by the end)
  m.dtype = "float32"                   # activation dtype: float32 | bfloat16
  m.gelu_approximate = False            # False: exact GELU; True: tanh approximation
  m.init_std = 0.02                     # std of the normal weight init
  m.causal = True                       # False ONLY for the causal-break experiment
  m.pos_encoding = "learned"            # learned (position table) | rope (rotary q/k)
  m.rope_base = 10000.0                 # rotary base; used only with pos_encoding=rope
  m.norm = "layernorm"                  # layernorm | rmsnorm
  m.mlp = "gelu"                        # gelu (see gelu_approximate) | swiglu
  m.n_kv_heads = 0                      # key/value heads: 0 = n_heads (MHA), 1 = MQA, else GQA
  m.tie_embeddings = False              # True: the LM head is the token embedding transposed
  # Biases and norm epsilon: lmmask's own decoder uses every bias and 1e-6; imported
  # families set them (Llama: no biases, eps ~1e-5; Qwen2: q/k/v bias only; GPT-2: 1e-5).
  m.qkv_bias = True                     # bias on the fused q/k/v projection
  m.out_bias = True                     # bias on the attention output projection
  m.mlp_bias = True                     # bias on the MLP layers
  m.head_bias = True                    # bias on the untied LM head
  m.norm_eps = 1e-6                     # epsilon of every LayerNorm / RMSNorm
  # Speed options: all exact, the defaults are the reference path.
  m.attention = "auto"                  # auto | einsum (reference) | xla | cudnn | splash (TPU
                                        # kernel) | triton (GPU kernel); auto is resolved once at
                                        # startup (resolve_attention): einsum on CPU
  m.remat = False                       # recompute block activations in backward (memory)
  m.scan_layers = False                 # lax.scan over layers (compile time; slower on CPU)

  c.loss = ConfigDict()
  c.loss.reduction = "token_mean"       # token_mean | seq_mean | seq_mean_of_means | sum
  c.loss.z_loss = 0.0                   # z-loss coefficient (t5x: 1e-4); 0 disables; logged
                                        # as `z_loss`, never part of the reported loss/PPL
  c.loss.logits_chunk = 0               # >0: training loss over chunks of this many positions,
                                        # float32 (B,T,V) logits never whole (memory); 0: one pass

  c.optim = o = ConfigDict()
  o.name = "adamw"                      # adamw | sgd
  o.lr = 3e-3                           # peak learning rate
  o.warmup_steps = 50                   # linear warmup from 0
  o.schedule = "cosine"                 # after warmup: cosine | linear | constant
  o.decay_steps = 120                   # schedule horizon (part of the experiment's identity)
  o.end_lr_factor = 0.1                 # final lr = lr * end_lr_factor
  o.b1 = 0.9                            # AdamW beta1
  o.b2 = 0.98                           # AdamW beta2
  o.eps = 1e-9                          # AdamW epsilon
  o.weight_decay = 0.1                  # decoupled decay on matrices/embeddings only
  o.momentum = 0.0                      # SGD momentum (0 = plain SGD)
  o.clip_norm = 1.0                     # global-norm clipping; 0 disables
  o.grad_accum_steps = 1                # micro-batches per step (exact token mean); divides batch

  c.train = t = ConfigDict()
  # 120 steps (~15 epochs of the verbs corpus): the held-out verbs' English-side loss
  # is lowest around steps 80-120 and rises after it as the model grows confident about
  # verbs it never saw (600 steps ended 36% above the best), so longer runs report an
  # overfit model (experiments/tokens).
  t.steps = 120                         # total optimizer steps (extending it resumes)
  t.log_every = 10                      # steps between metric log lines
  t.eval_every = 20                     # steps between validation passes
  t.ckpt_every = 200                    # steps between checkpoints (one is always saved at the end)
  t.keep_checkpoints = 2                # latest checkpoints kept (the best one is kept apart)
  t.progress_bar = True                 # tqdm bar on a terminal (never on a pipe)
  t.jax_cache_dir = "~/.cache/lmmask/jax"  # persistent compilation cache; "" disables
  t.init_from = ""                      # workdir of a base run: its architecture and latest
                                        # params, a fresh optimizer (fine-tuning)
  # Failure handling (docs/failures.md); both may change when resuming.
  t.nonfinite = "stop"                  # NaN/inf loss or grads: stop | skip (drop update, count)
  t.resume = "auto"                     # auto: continue from the latest checkpoint, else start;
                                        # require: refuse to start without a checkpoint
  t.profile_start = -1                  # first step of a jax.profiler trace; -1 = off
  t.profile_steps = 5                   # steps traced (into workdir/profile)

  # Evaluation extras and leak diagnostics (lmmask/eval/); never part of
  # the experiment's identity.
  c.eval = e = ConfigDict()
  e.direction = "es_en"                 # verbs exact match: es_en ("<bos> spanish /" -> English)
  e.max_new_tokens = 8                  # generation budget per exact-match prompt / continuation
  e.num_examples = 12                   # example completions shown next to the references
  e.exact_match_at_end = True           # greedy exact match on val into results.json
  e.floor_tolerance = 0.01              # alarm when full-train token-mean loss < floor - this
  e.floor_max_tokens = 1 << 20          # the entropy floor is computed only for training sets
                                        # up to this many tokens (a trie of every prefix)
  e.audit_tolerance = 1e-5              # audit: largest allowed logit change / attention mass
  e.audit_batches = 2                   # eval batches (per split) the audit probes use
  e.audit_heatmaps = 3                  # examples drawn as attention heat maps by the audit
  e.prompt_tokens = 16                  # text eval: tokens of each held-out opening to continue
  # lm-evaluation-harness (lmmask/eval/harness.py, docs/evaluation.md; pip install "lmmask[eval]").
  e.harness_tasks = ""                  # comma-separated lm-eval tasks (names or YAML files) run
                                        # on the live weights at every eval_every; "" = none
  e.harness_include_path = ""           # a folder of task YAMLs (e.g. tasks/) for task names
  e.harness_limit = 0                   # examples per task in training (0 = all)
  e.harness_num_fewshot = -1            # few-shot examples in training (-1 = the task's own)
  e.harness_batch_rows = 8              # rows per scoring forward; prompts per generate batch
  e.harness_row_tokens = 512            # packed row length (a longer request gets its own row)
  e.harness_packing = True              # several requests per row (segment ids); False: one
  e.harness_truncation = True           # left-truncate requests longer than the model (as the
                                        # hf backend); False: refuse them
  e.harness_max_gen_toks = 256          # generation budget when a task sets none (lm-eval's)

  # The add-k n-gram baseline on the same split (lmmask/eval/ngram.py).
  c.baseline = ConfigDict()
  c.baseline.ngram_n = 3                # n-gram order (context = previous n-1 tokens)
  c.baseline.ngram_k = 0.1              # add-k smoothing constant (> 0)

  # Device mesh. The batch is split over data x fsdp, parameters and optimizer
  # state over fsdp. data * fsdp must equal the device count.
  c.mesh = ConfigDict()
  c.mesh.data = -1                      # data-parallel ways; -1 = all remaining devices
  c.mesh.fsdp = 1                       # parameter-sharding ways; -1 = all remaining devices
  # CPU only: this many XLA:CPU devices (jax_num_cpu_devices, set by launch.py before JAX
  # starts), so mesh.data=-1 trains data parallel, one core per device (XLA:CPU runs most
  # fused kernels on one thread). 0 = auto (parallel.resolve_cpu_devices): the count XLA_FLAGS
  # forces, else 1 when distributed.mode != off, else every core if the train and eval
  # batches divide, else 1; logged and recorded in config.json (a resume reuses it).
  # 1 = off; ignored on GPU/TPU.
  c.mesh.cpu_devices = 0

  # Multi-host (one process per host) and launch.py --processes (docs/scaling.md).
  c.distributed = ConfigDict()
  c.distributed.mode = "off"            # off | auto (TPU pods, SLURM, MPI) | manual
  c.distributed.coordinator_address = config_dict.placeholder(str)  # manual: "host:port"
  c.distributed.num_processes = config_dict.placeholder(int)        # manual: process count
  c.distributed.process_id = config_dict.placeholder(int)           # manual: this process
  c.distributed.heartbeat_timeout_s = 100  # a silent process is declared dead after this and
                                           # the others exit with an error (JAX: 100 s)
  c.distributed.shutdown_timeout_s = 300   # wait for the others at shutdown (JAX: 300 s)
  c.distributed.barrier_timeout_s = 1800   # longest wait at lmmask's barriers (the others
                                           # wait while process 0 builds the workdir's files)
  return c


# Fields that may change between runs of the same experiment (run length, cadence,
# layout and speed knobs that do not change the maths, the failure policy).
RESUMABLE_FIELDS = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.ckpt_every",
    "train.keep_checkpoints", "train.progress_bar", "train.jax_cache_dir",
    "train.profile_start", "train.profile_steps", "mesh.data", "mesh.fsdp", "mesh.cpu_devices",
    "distributed.mode", "distributed.coordinator_address", "distributed.num_processes",
    "distributed.process_id", "distributed.heartbeat_timeout_s",
    "distributed.shutdown_timeout_s", "distributed.barrier_timeout_s", "model.attention",
    "model.remat", "model.scan_layers",
    "optim.grad_accum_steps",
    "train.nonfinite", "train.resume",  # "skip" after a NaN stop is how to go on
    # Preparation knobs: a prepared corpus's own fingerprint refuses a change that matters.
    "data.workers", "data.max_bad_fraction", "data.chunk_bytes", "data.shard_tokens",
    "data.vocab_size", "data.tokenizer", "data.tokenizer_sample_bytes",
})
# Whole sections that only change how a model is evaluated or prepared, never how it
# trains (prepare.* is read by --mode=prepare only; the dataset's identity is checked
# through its own fingerprint).
RESUMABLE_SECTIONS = ("eval.", "baseline.", "prepare.")

# Model fields that are training or speed knobs, not architecture: a fine-tuning run
# (train.init_from) may set them differently from its base run. Everything else in
# DecoderConfig, plus model.causal, must match the base.
TRAINING_KNOBS = ("dropout", "dtype", "init_std", "attention", "remat", "scan_layers")
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(DecoderConfig)
                    if f.name not in TRAINING_KNOBS) + ("causal",)

# Renamed fields: old saved name -> current name.
RENAMED = {"data.pack": "data.packing"}
# prepare.* knobs now under data.*: they described a "shards" corpus's dataset.
PREPARE_MOVED = ("vocab_size", "tokenizer", "shard_tokens")
# Fields added after workdirs already existed whose absence meant a behaviour other
# than today's default. Every other missing field takes its default.
ABSENT_MEANS = {"mesh.cpu_devices": 1}


# ---------------------------------------------------------------------------
# Dicts and overrides.

def flatten(d, prefix: str = "") -> dict:
  """Nested dict/ConfigDict -> {dotted key: value} (lists stay values)."""
  d = d.to_dict() if hasattr(d, "to_dict") else d
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def to_dict(config) -> dict:
  """A JSON-able dict of `config` (tuples become lists, as they come back from JSON)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d))


def apply_overrides(config, overrides: dict):
  """Set dotted keys in a copy of `config`; every key must already exist."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node, parts = config, key.split(".")
    for i, p in enumerate(parts):
      if not hasattr(node, "keys") or p not in node:
        where = ".".join(parts[:i]) or "the config"
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        raise ValueError(f"override {key!r}: {where} has no field {p!r}; valid: {valid}")
      if i < len(parts) - 1:
        node = node[p]
    if hasattr(node[parts[-1]], "keys"):
      raise ValueError(f"override {key!r} names a section, not a field; "
                       f"override its fields, e.g. {key}.{sorted(node[parts[-1]].keys())[0]}")
    try:
      node[parts[-1]] = value
    except TypeError as e:
      raise ValueError(f"override {key}={value!r} has the wrong type: {e}") from None
  return config

_BOOL = {"true": True, "false": False, "1": True, "0": False}


def parse_bool(value: str) -> bool:
  if value.lower() not in _BOOL:
    raise ValueError(f"expected true or false, got {value!r}")
  return _BOOL[value.lower()]


def parse_arg(arg, variants: dict, where: str) -> dict:
  """The variant grammar shared by every config: comma-separated names (flags, whose
  parser in `variants` is None) or key=value pairs. Returns {name: value}."""
  out = {}
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in variants:
      raise ValueError(f"{where}: unknown variant {key!r}; valid: {', '.join(sorted(variants))}")
    parser = variants[key]
    if parser is None:
      if eq:
        raise ValueError(f"{where}: variant {key!r} is a name and takes no value")
      out[key] = True
      continue
    if not eq:
      raise ValueError(f"{where}: variant {key!r} needs a value ({key}=...)")
    try:
      out[key] = parser(value.strip())
    except ValueError as e:
      raise ValueError(f"{where}: variant {key}={value.strip()!r}: {e}") from None
  return out


def load_file(spec: str) -> ConfigDict:
  """The config of "path/to/config.py[:arg]" (the file's get_config(arg))."""
  path, _, arg = spec.partition(":")
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  name = "lmmask_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def upgrade(saved: dict) -> ConfigDict:
  """A saved config.json (of any lmmask version) as a complete current config:
  renamed fields moved, fields added since filled with what their absence meant."""
  flat = flatten(saved)
  for old, new in RENAMED.items():
    if old in flat:
      flat.setdefault(new, flat.pop(old))
  for f in PREPARE_MOVED:
    old = flat.pop(f"prepare.{f}", None)
    if old is not None and flat.get("data.corpus") == "shards":
      flat[f"data.{f}"] = old
  base = flatten(defaults())
  for key, value in base.items():
    if key not in flat:
      flat[key] = ABSENT_MEANS.get(key, value)
  out = {}
  for key, value in flat.items():
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return ConfigDict(out)


def identity_diff(saved: dict, new: dict) -> list[tuple[str, object, object]]:
  """(field, saved, new) for every field that makes the two configs different
  experiments (both sides upgraded first, so a field added later compares equal to
  the behaviour its absence meant)."""
  a, b = flatten(upgrade(saved)), flatten(upgrade(new))
  keys = sorted(k for k in (set(a) | set(b)) - RESUMABLE_FIELDS
                if not k.startswith(RESUMABLE_SECTIONS))
  return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in keys
          if a.get(k, "<absent>") != b.get(k, "<absent>")]


# ---------------------------------------------------------------------------
# Checks and the decoder.

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(config) -> None:
  """Clear errors for values that would otherwise fail deep inside a run."""
  def need(cond, field, msg):
    if not cond:
      raise ValueError(f"config.{field}: {msg}")
  d, m, o, t, e = config.data, config.model, config.optim, config.train, config.eval
  need(d.corpus in CORPORA, "data.corpus", f"unknown corpus {d.corpus!r}; valid: "
       f"{', '.join(CORPORA)}")
  need(d.tokens in verbs.TOKENIZATIONS, "data.tokens", f"unknown tokenization {d.tokens!r}; "
       f"valid: {', '.join(verbs.TOKENIZATIONS)}")
  need(d.tokens == "word" or d.corpus == "verbs", "data.tokens",
       f"{d.tokens!r} is the verbs corpus's character tokenizer; corpus {d.corpus!r} brings "
       f"its own tokenizer, so set data.tokens='word' (or leave it out)")
  if d.corpus == "verbs" and d.tokens == "char":
    # A word-sized budget would score every character reference wrong unseen.
    for key, least in verbs.fit_lengths("char").items():
      section, field = key.split(".")
      need(config[section][field] >= least, key,
           f"{config[section][field]} is too small for character tokens (the longest line "
           f"and reply need {least}); use configs/verbs.py:tokens=char, which sizes it")
  need(d.pad_side in ("left", "right"), "data.pad_side", f"must be left|right, got {d.pad_side!r}")
  for f in ("batch_size", "eval_batch_size", "length"):
    need(_is_int(d[f]) and d[f] > 0, f"data.{f}", f"must be a positive int, got {d[f]!r}")
  need(d.length >= 2, "data.length", "must be >= 2 (an input and a target)")
  for f in ("d_model", "n_layers", "n_heads", "d_ff", "max_len"):
    need(_is_int(m[f]) and m[f] > 0, f"model.{f}", f"must be a positive int, got {m[f]!r}")
  need(m.d_model % m.n_heads == 0, "model.d_model",
       f"{m.d_model} is not divisible by model.n_heads={m.n_heads}; make d_model a multiple "
       f"of n_heads (e.g. {m.n_heads * max(1, m.d_model // m.n_heads)}) or change n_heads")
  for f in ("remat", "scan_layers"):  # the Decoder cannot thread dropout keys through them
    need(not (m[f] and m.dropout > 0), f"model.{f}", f"True needs model.dropout=0 (is {m.dropout}) or model.{f}=False")
  need(m.max_len >= d.length - 1, "model.max_len",
       f"{m.max_len} is shorter than the model input length data.length-1={d.length - 1}")
  need(config.loss.reduction in losses.REDUCTIONS, "loss.reduction",
       f"unknown reduction {config.loss.reduction!r}; valid: {', '.join(losses.REDUCTIONS)}")
  need(config.loss.z_loss >= 0, "loss.z_loss", f"must be >= 0 (0 disables), got "
       f"{config.loss.z_loss}")
  need(_is_int(config.loss.logits_chunk) and config.loss.logits_chunk >= 0, "loss.logits_chunk",
       f"must be an int >= 0 (0 = one pass), got {config.loss.logits_chunk!r}")
  need(_is_num(o.lr) and o.lr > 0, "optim.lr", f"must be a number > 0, got {o.lr!r}")
  need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
  need(o.decay_steps > o.warmup_steps, "optim.decay_steps",
       f"{o.decay_steps} must exceed warmup_steps={o.warmup_steps}")
  need(o.schedule in optim.SCHEDULES, "optim.schedule",
       f"unknown {o.schedule!r}; valid: {', '.join(optim.SCHEDULES)}")
  need(o.name in optim.OPTIMIZERS, "optim.name",
       f"unknown {o.name!r}; valid: {', '.join(optim.OPTIMIZERS)}")
  need(o.clip_norm >= 0, "optim.clip_norm", f"must be >= 0, got {o.clip_norm}")
  for f in ("steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
    need(_is_int(t[f]) and t[f] > 0, f"train.{f}", f"must be a positive int, got {t[f]!r}")
  need(t.nonfinite in NONFINITE_POLICIES, "train.nonfinite",
       f"unknown policy {t.nonfinite!r}; valid: {', '.join(NONFINITE_POLICIES)}")
  need(t.resume in RESUME_POLICIES, "train.resume",
       f"unknown policy {t.resume!r}; valid: {', '.join(RESUME_POLICIES)}")
  ga = o.grad_accum_steps
  need(_is_int(ga) and ga > 0, "optim.grad_accum_steps", f"must be a positive int, got {ga!r}")
  need(d.batch_size % ga == 0, "optim.grad_accum_steps",
       f"{ga} must divide data.batch_size={d.batch_size}")
  need(not d.packing or d.corpus in ("verbs", "text"), "data.packing",
       f"corpus {d.corpus!r} keeps one whole document per row; set data.packing=False")
  need(m.attention in ("auto",) + ATTENTION_IMPLS, "model.attention",
       f"unknown {m.attention!r}; valid: auto, {', '.join(ATTENTION_IMPLS)}")
  need(not d.packing or m.attention == "auto" or m.attention in HONOURS_SEGMENTS,
       "model.attention", f"{m.attention!r} cannot apply packed rows' segment ids; with "
       f"data.packing use auto or one of {', '.join(HONOURS_SEGMENTS)}")
  need(not (d.packing and d.pad_side != "right"), "data.pad_side",
       "packing fills rows from the left; set data.pad_side=right with data.packing")
  need(config.eval.direction in DIRECTIONS, "eval.direction",
       f"must be one of {', '.join(DIRECTIONS)}, got {config.eval.direction!r}")
  need(not e.harness_tasks or importlib.util.find_spec("lm_eval") is not None,
       "eval.harness_tasks", 'lm-eval tasks need the eval extra: pip install "lmmask[eval]"')
  need(config.eval.floor_tolerance >= 0, "eval.floor_tolerance",
       f"must be >= 0, got {config.eval.floor_tolerance}")
  cpu, dist = config.mesh.cpu_devices, config.distributed
  need(_is_int(cpu) and cpu >= 0, "mesh.cpu_devices", f"must be an int >= 0 (0 = auto, 1 = off), got {cpu!r}")
  for f in ("heartbeat_timeout_s", "shutdown_timeout_s", "barrier_timeout_s"):
    need(_is_int(dist[f]) and dist[f] > 0, f"distributed.{f}", f"must be a positive int (seconds), got {dist[f]!r}")


def decoder_config(config, vocab_size: int, platform: str | None = None) -> DecoderConfig:
  """The DecoderConfig of `config.model`, with vocab_size=-1 resolved to the corpus's and
  model.attention resolved (`model.resolve_attention`) for `platform` (default: JAX's
  backend), once at startup: every caller builds its model through here."""
  m = dict(config.model)
  m.pop("causal")
  m["attention"] = resolve_attention(m["attention"], platform or jax.default_backend(),
                                     packed=bool(config.data.packing))
  if m["vocab_size"] == -1:
    m["vocab_size"] = vocab_size
  elif m["vocab_size"] != vocab_size:
    raise ValueError(f"config.model.vocab_size={m['vocab_size']} but the corpus vocabulary "
                     f"has {vocab_size} tokens; set it to -1 or {vocab_size}")
  return DecoderConfig.from_dict(m)
