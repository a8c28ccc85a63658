"""Chat fine-tuning with loss masks: pre-train on plain text, then fine-tune on chat.

  python launch.py --mode=prepare --config=configs/chat.py:pretrain   # text shards + tokenizer
  python launch.py --mode=prepare --config=configs/chat.py:sft        # chat shards (same tokenizer)
  python launch.py --config=configs/chat.py:pretrain --workdir=runs/chat/base
  python launch.py --config=configs/chat.py:sft --workdir=runs/chat/sft \
      --config.train.init_from=runs/chat/base
  python launch.py --config=configs/chat.py:sft,mask=false --workdir=runs/chat/sft_nomask \
      --config.train.init_from=runs/chat/base

Variants (comma-separated): pretrain | sft (the phase; default pretrain),
mask=true|false (data.use_loss_mask, sft only), seed=N, tiny (test size),
data=DIR (dataset directory; default runs/data/text or runs/data/chat).
The model section is shared by both phases, so an SFT run's architecture equals
its base run's; init_from refuses any difference by field name.
"""
from ml_collections import config_dict

_BOOL = {"true": True, "false": False, "1": True, "0": False}
_ARGS = {"pretrain": None, "sft": None, "mask": lambda v: _BOOL[v.lower()], "seed": int,
         "tiny": None, "data": str}
TEXT_DATA = "runs/data/text"
CHAT_DATA = "runs/data/chat"


def _parse(arg):
  out = {}
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in _ARGS:
      raise ValueError(f"configs/chat.py: unknown variant {key!r}; valid: {sorted(_ARGS)}")
    out[key] = True if _ARGS[key] is None else _ARGS[key](value.strip())
  if out.get("pretrain") and out.get("sft"):
    raise ValueError("configs/chat.py: choose one phase, pretrain or sft")
  return out


def get_config(arg=None):
  args = _parse(arg)
  sft = bool(args.get("sft"))
  c = config_dict.ConfigDict()
  c.name = "chat_sft" if sft else "chat_pretrain"  # experiment name, recorded with results
  c.seed = args.get("seed", 0)          # seeds params, dropout and data order

  c.data = config_dict.ConfigDict()
  c.data.corpus = "shards"              # token + mask shards (lmmask/data/shards.py)
  c.data.path = args.get("data", CHAT_DATA if sft else TEXT_DATA)  # dataset directory
  c.data.train_split = "train"          # split directory used for training batches
  c.data.val_split = "val"              # split directory used for validation
  c.data.use_loss_mask = args.get("mask", True) if sft else False  # True: only mask-1
                                        # tokens count (assistant turns); False: every real token
  c.data.length = 80                    # row length L: one whole document per row, padded
  c.data.pad_side = "right"             # rows are right-padded (whole documents from token 0)
  c.data.batch_size = 32                # documents per training step
  c.data.eval_batch_size = 64           # documents per evaluation batch
  c.data.max_eval_docs = 256            # cap on documents per evaluation set (0 = all)

  c.prepare = config_dict.ConfigDict()  # --mode=prepare: writes data.path
  c.prepare.format = "chat" if sft else "text"  # chat: role tags + assistant mask; text: all-ones
  c.prepare.source = "synthetic"        # synthetic: the embedded data set; jsonl: the files below
  c.prepare.train_file = ""             # source=jsonl: training JSONL
  c.prepare.val_file = ""               # source=jsonl: validation JSONL
  c.prepare.num_train = 6000 if sft else 8000  # synthetic: training records
  c.prepare.num_val = 400               # synthetic: validation records
  c.prepare.synthetic_seed = 0          # synthetic: generator seed
  c.prepare.tokenizer = f"{TEXT_DATA}/tokenizer.json" if sft else ""  # reuse this tokenizer
                                        # ("" = train a byte-level BPE on the training text)
  c.prepare.vocab_size = 512            # BPE vocabulary size when training one
  c.prepare.max_tokens = 0              # drop longer records (0 = data.length)
  c.prepare.shard_tokens = 1 << 24      # tokens per shard file
  c.prepare.overwrite = False           # replace an existing data.path

  c.model = config_dict.ConfigDict()    # shared by both phases (init_from checks it)
  c.model.vocab_size = -1               # -1: the dataset's vocabulary size (checked if set)
  c.model.d_model = 64                  # residual width
  c.model.n_layers = 2                  # transformer blocks
  c.model.n_heads = 4                   # attention heads
  c.model.d_ff = 256                    # MLP hidden width
  c.model.max_len = 80                  # position table size (>= data.length - 1)
  c.model.dropout = 0.0 if sft else 0.1  # a training parameter: taken from this config
  c.model.dtype = "float32"             # activation dtype: float32 | bfloat16
  c.model.gelu_approximate = False      # False: exact GELU; True: tanh approximation
  c.model.init_std = 0.02               # std of the normal weight init
  c.model.causal = True                 # decoder LM

  c.loss = config_dict.ConfigDict()
  c.loss.reduction = "token_mean"       # token_mean|seq_mean|seq_mean_of_means|sum

  c.optim = config_dict.ConfigDict()
  c.optim.name = "adamw"                # adamw | sgd
  c.optim.lr = 1e-3 if sft else 3e-3    # peak learning rate (lower for fine-tuning)
  c.optim.warmup_steps = 50 if sft else 100  # linear warmup from 0
  c.optim.schedule = "cosine"           # after warmup: cosine | linear | constant
  c.optim.decay_steps = 400 if sft else 1500  # schedule horizon
  c.optim.end_lr_factor = 0.1           # final lr = lr * end_lr_factor
  c.optim.b1 = 0.9                      # AdamW beta1
  c.optim.b2 = 0.98                     # AdamW beta2
  c.optim.eps = 1e-9                    # AdamW epsilon
  c.optim.weight_decay = 0.01           # decoupled decay on matrices/embeddings only
  c.optim.momentum = 0.0                # SGD momentum (0 = plain SGD)
  c.optim.clip_norm = 1.0               # global-norm clipping; 0 disables

  c.train = config_dict.ConfigDict()
  c.train.steps = 400 if sft else 1500  # total optimizer steps (extending it resumes)
  c.train.log_every = 50                # steps between metric log lines
  c.train.eval_every = 200              # steps between validation passes
  c.train.ckpt_every = 200              # steps between checkpoints (one is always saved at the end)
  c.train.keep_checkpoints = 2          # latest checkpoints kept (the best one is kept apart)
  c.train.progress_bar = True           # tqdm bar on a terminal (never on a pipe)
  c.train.jax_cache_dir = "~/.cache/lmmask/jax"  # persistent compilation cache; "" disables
  c.train.init_from = ""                # workdir of a base run: its architecture and latest
                                        # params, a fresh optimizer ("" = from scratch)

  if args.get("tiny"):
    # Seconds on a laptop: for tests.
    c.data.length = 64
    c.data.batch_size = 8
    c.data.eval_batch_size = 16
    c.data.max_eval_docs = 32
    c.prepare.num_train = 200
    c.prepare.num_val = 24
    c.prepare.vocab_size = 300
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.d_ff = 64
    c.model.max_len = 64
    c.optim.warmup_steps = 2
    c.optim.decay_steps = 20
    c.train.steps = 6
    c.train.log_every = 2
    c.train.eval_every = 3
    c.train.ckpt_every = 3
  return c
