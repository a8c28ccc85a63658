"""Pre-training on plain text: a file or a directory named in data.path.

  python launch.py --config=configs/text.py --workdir=/tmp/lmmask/gpl3
  python launch.py --config=configs/text.py:modern --workdir=/tmp/lmmask/gpl3_modern
  python launch.py --config=configs/text.py --config.data.path=~/my_texts --workdir=...

Variants (comma-separated in the config argument):
  modern       RoPE + RMSNorm + SwiGLU, d_ff chosen for the default's parameter count
  tiny         test size (seconds)
  path=P       data.path (no commas); seed=N
  steps=N      train.steps and the schedule's horizon optim.decay_steps

The first run splits the text into documents (paragraphs of a file, or files of a
directory), holds out a fraction of the documents, trains a byte-level BPE on the
training documents into <workdir>/tokenizer.json and writes token shards into
<workdir>/data/{train,val}; later runs (resume, --mode=eval) reuse them.

Expected result (GPL-3, 400 steps, seed 0, 2 CPU cores): see docs/text.md.
"""
from lmmask.config import defaults, parse_arg

VARIANTS = {"modern": None, "tiny": None, "path": str, "seed": int, "steps": int}


def get_config(arg=None):
  args = parse_arg(arg, VARIANTS, "configs/text.py")
  c = defaults()
  c.name = "text"
  c.seed = args.get("seed", c.seed)

  c.data.corpus = "text"
  c.data.path = args.get("path", "/usr/share/common-licenses/GPL-3")
  c.data.split = "documents"            # the only policy for text: held out by document
  c.data.length = 65                    # tokens per row; windows of a document overlap by 1
  c.data.packing = True                 # pack short windows into one row (segment ids)
  c.data.batch_size = 16
  c.data.eval_batch_size = 32

  c.model.d_model = 96
  c.model.n_layers = 3
  c.model.d_ff = 384
  c.model.max_len = 64
  c.model.dropout = 0.2

  c.loss.z_loss = 1e-4                  # keeps the softmax normaliser near 0 on a real vocabulary

  c.optim.lr = 1e-3
  c.optim.decay_steps = 400

  c.train.steps = args.get("steps", 400)
  c.train.log_every = 50
  c.train.eval_every = 25               # cheap here

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
  if "steps" in args:  # the lr schedule ends where the run does
    c.optim.decay_steps = args["steps"]
  return c
