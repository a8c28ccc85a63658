"""The default experiment: a ~120k-parameter decoder on the verb-grammar corpus.

Run (under a minute on 2 CPU cores):

  python launch.py --config=configs/verbs.py --workdir=runs/verbs

Variants go through the config argument (comma-separated key=value):

  python launch.py --config=configs/verbs.py:split=tense,reduction=sum --workdir=...
  python launch.py --config=configs/verbs.py:causal=false --workdir=...   # the break
  python launch.py --config=configs/verbs.py:tiny --workdir=...           # test size

Expected result (split "verbs", 600 steps, seed 0, measured on 2 CPU cores):
train PPL 2.07 (accuracy 0.77; the corpus' own entropy keeps it from 1), val PPL
about 19 on the held-out verbs look/like/see/eat, English-side val PPL about 12.
Held-out verbs' Spanish forms are never seen as targets in training, so their
val loss is dominated by words the model cannot know; the English side, whose
lexemes appear in the lexicon lines, is the fairer number.
"""
from ml_collections import config_dict

# Variant keys accepted in the config argument, with their parser.
_BOOL = {"true": True, "false": False, "1": True, "0": False}
_ARGS = {
    "split": str,
    "reduction": str,
    "causal": lambda v: _BOOL[v.lower()],
    "seed": int,
    "pad_side": str,
    "tiny": None,
}


def _parse(arg):
  out = {}
  if not arg:
    return out
  for item in arg.split(","):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in _ARGS:
      raise ValueError(f"configs/verbs.py: unknown variant {key!r}; valid: {sorted(_ARGS)}")
    out[key] = True if _ARGS[key] is None else _ARGS[key](value.strip())
  return out


def get_config(arg=None):
  args = _parse(arg)
  c = config_dict.ConfigDict()
  c.name = "verbs"                      # experiment name, recorded with results
  c.seed = args.get("seed", 0)          # seeds params, dropout and data order

  c.data = config_dict.ConfigDict()
  c.data.corpus = "verbs"               # the embedded verb-grammar corpus
  c.data.split = args.get("split", "verbs")  # held-out policy: verbs | tense | person
  c.data.include_lexicon = True         # add "trabajar / work" lines for all 20 verbs to train
  c.data.length = 14                    # every batch is padded to this many tokens (L)
  c.data.pad_side = args.get("pad_side", "right")  # right | left; the loss is identical
  c.data.batch_size = 32                # sequences per training step
  c.data.eval_batch_size = 64           # sequences per evaluation batch
  # issue 7: packing (several documents per row, segment ids, positions restart)
  c.data.packing = False                # pack training documents; raise data.length to gain
  c.data.pack_docs_per_row = 2          # packing: documents drawn per row per step

  c.model = config_dict.ConfigDict()
  c.model.vocab_size = -1               # -1: the corpus vocabulary's size (checked if set)
  c.model.d_model = 64                  # residual width
  c.model.n_layers = 2                  # transformer blocks
  c.model.n_heads = 4                   # attention heads (d_model % n_heads == 0)
  c.model.d_ff = 192                    # MLP hidden width
  c.model.max_len = 16                  # learned position table size (>= data.length - 1)
  c.model.dropout = 0.1                 # dropout on embeddings and residual branches
  c.model.dtype = "float32"             # activation dtype: float32 | bfloat16
  c.model.gelu_approximate = False      # False: exact GELU; True: tanh approximation
  c.model.init_std = 0.02               # std of the normal weight init
  c.model.causal = args.get("causal", True)  # False ONLY for the causal-break experiment
  c.model.pos_encoding = "learned"      # learned (position table) | rope (rotary q/k)
  c.model.rope_base = 10000.0           # rotary base; used only with pos_encoding=rope
  c.model.norm = "layernorm"            # layernorm | rmsnorm
  c.model.mlp = "gelu"                  # gelu (see gelu_approximate) | swiglu (d_ff per branch)
  c.model.n_kv_heads = 0                # key/value heads: 0 = n_heads (MHA), 1 = MQA, else GQA
  c.model.tie_embeddings = False        # True: the LM head is the token embedding transposed
  # issue 7: speed options (all exact; off = the reference path)
  c.model.attention = "einsum"          # einsum (reference) | xla | cudnn (GPU fused kernel)
  c.model.remat = False                 # recompute block activations in backward (memory)
  c.model.scan_layers = False           # lax.scan over layers (compile time; slower on CPU)

  c.loss = config_dict.ConfigDict()
  c.loss.reduction = args.get("reduction", "token_mean")  # token_mean|seq_mean|seq_mean_of_means|sum
  c.loss.z_loss = 0.0                   # z-loss coefficient (t5x: 1e-4); 0 disables; logged
                                        # as `z_loss`, never part of the reported loss/PPL

  c.optim = config_dict.ConfigDict()
  c.optim.name = "adamw"                # adamw | sgd
  c.optim.lr = 3e-3                     # peak learning rate
  c.optim.warmup_steps = 50             # linear warmup from 0
  c.optim.schedule = "cosine"           # after warmup: cosine | linear | constant
  c.optim.decay_steps = 600             # schedule horizon (part of the experiment's identity)
  c.optim.end_lr_factor = 0.1           # final lr = lr * end_lr_factor
  c.optim.b1 = 0.9                      # AdamW beta1
  c.optim.b2 = 0.98                     # AdamW beta2
  c.optim.eps = 1e-9                    # AdamW epsilon
  c.optim.weight_decay = 0.1            # decoupled decay on matrices/embeddings only
  c.optim.momentum = 0.0                # SGD momentum (0 = plain SGD)
  c.optim.clip_norm = 1.0               # global-norm clipping; 0 disables
  c.optim.grad_accum_steps = 1          # micro-batches per step (exact token mean); divides batch

  c.train = config_dict.ConfigDict()
  c.train.steps = 600                   # total optimizer steps (extending it resumes)
  c.train.log_every = 10                # steps between metric log lines
  c.train.eval_every = 100              # steps between validation passes
  c.train.ckpt_every = 200              # steps between checkpoints (one is always saved at the end)
  c.train.keep_checkpoints = 2          # latest checkpoints kept (the best one is kept apart)
  c.train.progress_bar = True           # tqdm bar on a terminal (never on a pipe)
  c.train.jax_cache_dir = "~/.cache/lmmask/jax"  # persistent compilation cache; "" disables

  # Failure handling (docs: "Resuming and failures"); both may change when resuming.
  c.train.nonfinite = "stop"            # NaN/inf loss or grads: stop | skip (drop update, count)
  c.train.resume = "auto"               # auto: continue from the latest checkpoint, else start;
                                        # require: refuse to start without a checkpoint
  c.train.profile_start = -1            # issue 7: first step of a jax.profiler trace; -1 = off
  c.train.profile_steps = 5             # steps traced (into workdir/profile)

  # issue 4: evaluation extras and leak diagnostics (lmmask/evaluation.py, floor.py, audit.py).
  c.eval = config_dict.ConfigDict()
  c.eval.direction = "es_en"            # exact match: es_en ("<bos> spanish /" -> English) | en_es
  c.eval.max_new_tokens = 8             # generation budget per exact-match prompt
  c.eval.num_examples = 12              # example completions shown next to the references
  c.eval.exact_match_at_end = True      # greedy exact match on val into results.json
  c.eval.floor_tolerance = 0.01         # alarm when full-train token-mean loss < floor - this
  c.eval.audit_tolerance = 1e-5         # audit: largest allowed logit change / attention mass
  c.eval.audit_batches = 2              # eval batches (per split) the audit probes use
  c.eval.audit_heatmaps = 3             # examples drawn as attention heat maps by the audit

  # issue 4: the add-k n-gram baseline on the same split (lmmask/ngram.py).
  c.baseline = config_dict.ConfigDict()
  c.baseline.ngram_n = 3                # n-gram order (context = previous n-1 tokens)
  c.baseline.ngram_k = 0.1              # add-k smoothing constant (> 0)

  # issue 7: device mesh. The batch is split over data x fsdp, parameters and
  # optimizer state over fsdp. data * fsdp must equal the device count.
  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1                      # data-parallel ways; -1 = all remaining devices
  c.mesh.fsdp = 1                       # parameter-sharding ways; -1 = all remaining devices
  # CPU only: split the host into this many XLA:CPU devices (jax_num_cpu_devices, set by
  # launch.py before JAX starts), so mesh.data=-1 trains data parallel on that many cores.
  # Same maths. XLA:CPU runs most fused elementwise kernels on one thread; on 2 cores 2
  # devices gave ~+8% tokens/s (README "Performance"). 1 = off; ignored on GPU/TPU.
  c.mesh.cpu_devices = 1

  # issue 7: multi-host (one process per host; see docs "Scaling out").
  c.distributed = config_dict.ConfigDict()
  c.distributed.mode = "off"            # off | auto (TPU pods, SLURM, MPI) | manual
  c.distributed.coordinator_address = config_dict.placeholder(str)  # manual: "host:port"
  c.distributed.num_processes = config_dict.placeholder(int)        # manual: process count
  c.distributed.process_id = config_dict.placeholder(int)           # manual: this process

  if args.get("tiny"):
    # A shrunken run for tests: seconds on a laptop.
    c.optim.weight_decay = 0.01           # the experiments/ ablations were measured with this
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.d_ff = 64
    c.data.batch_size = 16
    c.optim.warmup_steps = 5
    c.optim.decay_steps = 40
    c.train.steps = 20
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.ckpt_every = 10
    c.eval.exact_match_at_end = False   # issue 4: keep the shared tiny runs fast
  return c
