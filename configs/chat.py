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
Expected result: experiments/sft_loss_mask/REPORT.md.
"""
from lmmask.config import defaults, parse_arg, parse_bool

VARIANTS = {"pretrain": None, "sft": None, "mask": parse_bool, "seed": int, "tiny": None,
            "data": str}
TEXT_DATA = "runs/data/text"
CHAT_DATA = "runs/data/chat"


def get_config(arg=None):
  args = parse_arg(arg, VARIANTS, "configs/chat.py")
  if args.get("pretrain") and args.get("sft"):
    raise ValueError("configs/chat.py: choose one phase, pretrain or sft")
  sft = bool(args.get("sft"))
  c = defaults()
  c.name = "chat_sft" if sft else "chat_pretrain"
  c.seed = args.get("seed", c.seed)

  c.data.corpus = "shards"
  c.data.path = args.get("data", CHAT_DATA if sft else TEXT_DATA)
  c.data.split = ""                     # shards are split by directory (train_split/val_split)
  c.data.use_loss_mask = args.get("mask", True) if sft else False
  c.data.length = 80                    # one whole document per row, right-padded

  c.prepare.format = "chat" if sft else "text"
  c.prepare.num_train = 6000 if sft else 8000
  c.data.tokenizer = f"{TEXT_DATA}/tokenizer.json" if sft else ""  # SFT: the base's tokenizer

  c.model.d_ff = 256
  c.model.max_len = 80
  c.model.dropout = 0.0 if sft else 0.1  # a training parameter: taken from this config

  c.optim.lr = 1e-3 if sft else 3e-3    # lower for fine-tuning
  c.optim.warmup_steps = 50 if sft else 100
  c.optim.decay_steps = 400 if sft else 1500
  c.optim.weight_decay = 0.01

  c.train.steps = 400 if sft else 1500
  c.train.log_every = 50
  c.train.eval_every = 200

  c.eval.max_new_tokens = 16            # a whole assistant reply

  if args.get("tiny"):
    c.data.length = 64
    c.data.batch_size = 8
    c.data.eval_batch_size = 16
    c.data.max_eval_docs = 32
    c.prepare.num_train = 200
    c.prepare.num_val = 24
    c.data.vocab_size = 300
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
