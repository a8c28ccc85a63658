"""Pre-training on plain text: a file or a directory named in data.path.

  python launch.py --config=configs/text.py --workdir=/tmp/lmmask/gpl3
  python launch.py --config=configs/text.py:modern --workdir=/tmp/lmmask/gpl3_modern
  python launch.py --config=configs/text.py --config.data.path=~/my_texts --workdir=...

Variants (comma-separated in the config argument):
  modern       RoPE + RMSNorm + SwiGLU, d_ff chosen for the default's parameter count
  tiny         test size (seconds)
  path=P       data.path (no commas); seed=N; steps=N

The first run splits the text into documents (paragraphs of a file, or files of a
directory), holds out a fraction of the documents, trains a byte-level BPE on the
training documents into <workdir>/tokenizer.json and writes token shards into
<workdir>/data/{train,val}; later runs (resume, --mode=eval) reuse them.
"""
from ml_collections import config_dict

_ARGS = {"modern": None, "tiny": None, "path": str, "seed": int, "steps": int}


def _parse(arg):
  out = {}
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in _ARGS:
      raise ValueError(f"configs/text.py: unknown variant {key!r}; valid: {sorted(_ARGS)}")
    out[key] = True if _ARGS[key] is None else _ARGS[key](value.strip())
  return out


def get_config(arg=None):
  args = _parse(arg)
  c = config_dict.ConfigDict()
  c.name = "text"                       # experiment name, recorded with results
  c.seed = args.get("seed", 0)          # seeds params, dropout and data order

  c.data = config_dict.ConfigDict()
  c.data.corpus = "text"                # plain text files (lmmask/data/text.py)
  c.data.path = args.get("path", "/usr/share/common-licenses/GPL-3")  # a file or a directory
  c.data.doc_separator = "\n\n"         # documents inside a file (paragraphs); "" = whole file
  c.data.split = "documents"            # held-out policy (only one for text: by document)
  c.data.val_fraction = 0.1             # fraction of documents held out for validation
  c.data.split_seed = 0                 # seeds which documents are held out
  c.data.tokenizer = ""                 # an existing tokenizer.json; "" = train a byte-level
                                        # BPE on the training documents into the workdir
  c.data.vocab_size = 512               # BPE vocabulary size when training (>= 259)
  c.data.pad_token = "<pad>"            # special tokens (must exist in a given tokenizer)
  c.data.bos_token = "<bos>"
  c.data.eos_token = "<eos>"
  c.data.length = 65                    # tokens per row (L); windows of a document overlap by 1
  c.data.packing = True                 # pack short windows into one row (segment ids);
                                        # False: one window per padded row
  c.data.pad_side = "right"             # right | left (left only with packing=False)
  c.data.batch_size = 16                # rows per training step
  c.data.eval_batch_size = 32           # rows per evaluation batch
  c.data.max_eval_batches = 0           # cap on eval batches per split; 0 = the whole split
  c.data.shard_tokens = 1 << 26         # tokens per shard file

  c.model = config_dict.ConfigDict()
  c.model.vocab_size = -1               # -1: the tokenizer's size (checked if set)
  c.model.d_model = 96                  # residual width
  c.model.n_layers = 3                  # transformer blocks
  c.model.n_heads = 4                   # attention heads (d_model % n_heads == 0)
  c.model.d_ff = 384                    # MLP hidden width (per branch for swiglu)
  c.model.max_len = 64                  # >= data.length - 1 (position table; rope: a length cap)
  c.model.dropout = 0.2                 # dropout on embeddings and residual branches
  c.model.dtype = "float32"             # activation dtype: float32 | bfloat16
  c.model.gelu_approximate = False      # False: exact GELU; True: tanh approximation
  c.model.init_std = 0.02               # std of the normal weight init
  c.model.causal = True                 # always True for language modelling
  c.model.pos_encoding = "learned"      # learned (position table) | rope (rotary q/k)
  c.model.rope_base = 10000.0           # rotary base; used only with pos_encoding=rope
  c.model.norm = "layernorm"            # layernorm | rmsnorm
  c.model.mlp = "gelu"                  # gelu | swiglu
  c.model.n_kv_heads = 0                # key/value heads: 0 = n_heads (MHA), 1 = MQA, else GQA
  c.model.tie_embeddings = False        # True: the LM head is the token embedding transposed

  c.loss = config_dict.ConfigDict()
  c.loss.reduction = "token_mean"       # token_mean|seq_mean|seq_mean_of_means|sum
  c.loss.z_loss = 1e-4                  # z-loss coefficient (t5x); logged as z_loss, not in PPL

  c.optim = config_dict.ConfigDict()
  c.optim.name = "adamw"                # adamw | sgd
  c.optim.lr = 1e-3                     # peak learning rate
  c.optim.warmup_steps = 50             # linear warmup from 0
  c.optim.schedule = "cosine"           # after warmup: cosine | linear | constant
  c.optim.decay_steps = 400             # schedule horizon
  c.optim.end_lr_factor = 0.1           # final lr = lr * end_lr_factor
  c.optim.b1 = 0.9                      # AdamW beta1
  c.optim.b2 = 0.98                     # AdamW beta2
  c.optim.eps = 1e-9                    # AdamW epsilon
  c.optim.weight_decay = 0.1            # decoupled decay on matrices/embeddings only
  c.optim.momentum = 0.0                # SGD momentum (0 = plain SGD)
  c.optim.clip_norm = 1.0               # global-norm clipping; 0 disables

  c.train = config_dict.ConfigDict()
  c.train.steps = args.get("steps", 400)  # total optimizer steps (extending it resumes)
  c.train.log_every = 50                # steps between metric log lines
  c.train.eval_every = 25               # steps between validation passes (cheap here)
  c.train.ckpt_every = 200              # steps between checkpoints (one is always saved at the end)
  c.train.keep_checkpoints = 2          # latest checkpoints kept (the best one is kept apart)
  c.train.progress_bar = True           # tqdm bar on a terminal (never on a pipe)
  c.train.jax_cache_dir = "~/.cache/lmmask/jax"  # persistent compilation cache; "" disables

  if args.get("modern"):
    c.name = "text_modern"
    c.model.pos_encoding = "rope"
    c.model.norm = "rmsnorm"
    c.model.mlp = "swiglu"
    c.model.d_ff = 264                  # 3 matrices 96x264 ~ 2 of 96x384 (+ the position table)
  if args.get("tiny"):
    c.data.vocab_size = 300
    c.data.length = 33
    c.data.batch_size = 4
    c.data.eval_batch_size = 8
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.d_ff = 64
    c.model.max_len = 32
    c.optim.warmup_steps = 2
    c.optim.decay_steps = 20
    c.train.steps = args.get("steps", 6)
    c.train.log_every = 2
    c.train.eval_every = 3
    c.train.ckpt_every = 3
  return c
