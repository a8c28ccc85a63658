"""A pre-norm transformer decoder in flax.nnx.

Masks come from `lmmask.masks` as one boolean (B, 1, T, T) array, turned into one
additive bias, added to float32 attention logits before a float32 softmax. Rows
with no allowed key (e.g. a left-pad query) get zero attention output, so they
stay finite. Dropout RNGs are passed at call time, so the module holds only
parameters (no RNG counters to thread through jit or checkpoints).

Options (DecoderConfig; the defaults are the original decoder): learned or rotary
positions, LayerNorm or RMSNorm, GELU or SwiGLU MLP, grouped-query / multi-query
attention (`n_kv_heads`), tied input/output embeddings, which linear layers have
a bias, and the norm epsilon. Rotary embeddings are
driven by the `positions` array, never by the array index, so left padding,
packed segments (positions restart) and a cache's query offset all rotate each
token by its own position. For a KV cache: `Attention.project` returns q and the
already-rotated k, v of new tokens; `attend` takes any keys/values (e.g. cached
ones concatenated with new ones) and a (B, 1, Tq, Tk) boolean mask's bias.

Speed options (all exact, off = the reference path): `attention` picks
the einsum reference, jax.nn.dot_product_attention (xla | cudnn) fed with the
structured form of the same mask (`masks.attention_structure`), or a Pallas
kernel fed segment ids (`masks.kernel_mask`): splash (TPU) or Triton `mha` (GPU),
both run in interpret mode on a CPU backend (docs/performance.md); `remat`
recomputes block activations in the backward pass; `scan_layers` runs the
blocks in a lax.scan. Dense layers always see 2-D (N, features) inputs and q is
scaled before QK^T (both measured faster on XLA:CPU, see benchmarks/).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.gpu import attention as triton_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lmmask import masks, parallel

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
POS_ENCODINGS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "splash", "triton")
# Attention paths that keep packed rows' documents apart: einsum, xla and cudnn apply
# the boolean mask (cudnn folds it into its dense bias), splash and triton take the
# segment ids themselves. A fused kernel that takes only lengths or causality would
# silently let packed documents attend to each other: it must not be listed here, and
# packing then refuses it (config.validate, and the check in Decoder.__call__).
HONOURS_SEGMENTS = ("einsum", "xla", "cudnn", "splash", "triton")
# Pallas kernels: fed `masks.kernel_mask` (segment ids, T padded to KERNEL_BLOCK).
KERNELS = ("splash", "triton")
# Sequence tile of both kernels: T is padded up to a multiple of it. 128 is splash's
# smallest kv block (a multiple of the TPU's 128 lanes) and Triton mha's default q/k
# block (a power of two, as Triton's tiles must be).
KERNEL_BLOCK = 128

# Where each path runs; CPU runs every path but cudnn (the kernels in interpret mode).
ATTENTION_PLATFORMS = {"splash": ("tpu", "cpu"), "triton": ("gpu", "cpu"), "cudnn": ("gpu",)}


def resolve_attention(name: str, platform: str, *, packed: bool) -> str:
  """model.attention with `auto` resolved for `platform` (a JAX backend name): splash on
  TPU; on GPU triton for packed rows (segment ids, memory linear in T) and cudnn for
  unpacked ones (cudnn honours packing only through a dense T x T bias); einsum on CPU
  (the reference, so CPU results do not move). A named path the platform cannot run
  is refused, never replaced."""
  if name == "auto":
    return {"tpu": "splash", "gpu": "triton" if packed else "cudnn"}.get(platform, "einsum")
  runs_on = lambda n: platform in ATTENTION_PLATFORMS.get(n, (platform,))  # noqa: E731
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"config.model.attention: unknown {name!r}; valid: auto, "
                     f"{', '.join(ATTENTION_IMPLS)}")
  if not runs_on(name):
    raise ValueError(f"config.model.attention: {name!r} does not run on {platform}; use auto "
                     f"or one of {', '.join(n for n in ATTENTION_IMPLS if runs_on(n))}")
  return name


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int
  dropout: float                  # model.dropout of the config (decoder_config); no default here
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  d_ff: int = 192
  max_len: int = 16
  dtype: str = "float32"          # compute dtype of activations; params, logits of
                                  # attention, softmax and loss stay float32
  gelu_approximate: bool = False  # False: exact erf GELU; True: tanh approximation
  init_std: float = 0.02
  pos_encoding: str = "learned"   # learned: a (max_len, d_model) table; rope: rotary q/k
  rope_base: float = 10000.0      # rotary base (wavelengths up to 2*pi*base); rope only
  norm: str = "layernorm"         # layernorm | rmsnorm (no mean subtraction, no bias)
  mlp: str = "gelu"               # gelu: fc2(gelu(fc1 x)); swiglu: fc2(silu(gate) * up)
  n_kv_heads: int = 0             # key/value heads: 0 or n_heads = MHA, 1 = MQA, else GQA
  tie_embeddings: bool = False    # True: logits = x @ embed.T (no separate head, no bias)
  # Biases and norm epsilon, so imported families (Llama: none, Qwen2: q/k/v only) are exact.
  qkv_bias: bool = True           # bias on the fused q/k/v projection
  out_bias: bool = True           # bias on the attention output projection
  mlp_bias: bool = True           # bias on fc1 and fc2
  head_bias: bool = True          # bias on the untied LM head
  norm_eps: float = 1e-6          # epsilon of every LayerNorm / RMSNorm
  # Speed: rematerialisation, scan over layers; the attention path has no default here:
  # config.decoder_config passes the one model.attention resolved at startup.
  remat: bool = False             # recompute each block's activations in the backward pass
  scan_layers: bool = False       # lax.scan over blocks (compile time on accelerators)
  attention: str = dataclasses.field(kw_only=True)  # one of ATTENTION_IMPLS

  def __post_init__(self):
    def need(cond, msg):
      if not cond:
        raise ValueError(f"DecoderConfig: {msg}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
      v = getattr(self, name)
      need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
           f"{name} must be a positive int, got {v!r}")
    need(self.d_model % self.n_heads == 0,
         f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
    need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
    need(self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    need(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
    need(self.pos_encoding in POS_ENCODINGS,
         f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
    need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
    need(self.mlp in MLPS, f"mlp must be one of {MLPS}, got {self.mlp!r}")
    need(isinstance(self.n_kv_heads, int) and not isinstance(self.n_kv_heads, bool)
         and 0 <= self.n_kv_heads <= self.n_heads and self.n_heads % self.kv_heads == 0,
         f"n_kv_heads={self.n_kv_heads!r} must be 0 (= n_heads) or a divisor of "
         f"n_heads={self.n_heads} (1 = multi-query)")
    if self.pos_encoding == "rope":
      need(self.head_dim % 2 == 0, f"rope needs an even head dim, got d_model/n_heads="
           f"{self.head_dim}; change d_model or n_heads")
      need(self.rope_base > 1.0, f"rope_base must be > 1, got {self.rope_base}")
    for name in ("tie_embeddings", "qkv_bias", "out_bias", "mlp_bias", "head_bias"):
      need(isinstance(getattr(self, name), bool),
           f"{name} must be a bool, got {getattr(self, name)!r}")
    need(isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1,
         f"norm_eps must be a float in (0, 1), got {self.norm_eps!r}")
    need(self.attention in ATTENTION_IMPLS,
         f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attention!r} "
         f"('auto' is resolved by config.decoder_config before a DecoderConfig is built)")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @classmethod
  def from_dict(cls, d) -> DecoderConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown DecoderConfig field(s) {unknown}; valid: {sorted(fields)}")
    if "attention" not in d:
      raise ValueError("DecoderConfig needs attention (one of "
                       f"{', '.join(ATTENTION_IMPLS)}); it has no default of its own")
    return cls(**dict(d))


def _linear(cfg, din, dout, rngs, std=None, use_bias=True):
  return nnx.Linear(din, dout, rngs=rngs, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.normal(std or cfg.init_std), use_bias=use_bias)


def _dense(layer, x):
  """`layer` applied to x (..., features) as a 2-D (N, features) matmul.

  On XLA:CPU a 3-D dot fused with its neighbours made the backward pass ~2x
  slower (benchmarks/); the reshapes are free.
  """
  lead = x.shape[:-1]
  return layer(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


@jax.custom_vjp
def gelu_exact(x):
  """Exact (erf) GELU, x * Phi(x), with a hand-written backward.

  Same values as jax.nn.gelu(x, approximate=False); the backward reuses the saved
  Phi(x) and needs one exp, where autodiff of the erf form re-evaluated erf inside
  XLA:CPU fusions (the MLP's forward + backward ran ~2x faster this way).
  """
  return x * _phi(x)


def _phi(x):
  return 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_fwd(x):
  cdf = _phi(x)
  return x * cdf, (x, cdf)


def _gelu_bwd(res, g):
  x, cdf = res
  pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
  return (g * (cdf + x * pdf),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


def gelu(x, approximate: bool):
  return jax.nn.gelu(x, approximate=True) if approximate else gelu_exact(x)


def rope_frequencies(head_dim: int, base: float) -> jnp.ndarray:
  """(head_dim // 2,) float32 angular frequencies base**(-2i / head_dim)."""
  return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x, positions, base: float):
  """Rotate (B, T, H, D) queries or keys by their (B, T) integer positions.

  "Rotate half" layout: feature i pairs with feature i + D/2, and the pair is
  rotated by the angle positions * base**(-2i / D). Computed in float32, returned
  in x's dtype. Only `positions` decides the angle (a cache passes its offset).
  """
  x = jnp.asarray(x)
  positions = jnp.asarray(positions)
  if x.ndim != 4 or positions.shape != x.shape[:2]:
    raise ValueError(f"apply_rope needs x (B, T, H, D) and positions (B, T); got "
                     f"{x.shape} and {positions.shape}")
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"apply_rope needs an even head dim, got {d}")
  angles = positions.astype(jnp.float32)[:, :, None, None] * rope_frequencies(d, base)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attend(q, k, v, bias, has_key, head_mask=None):
  """Grouped attention: q (B, Tq, H, D), k and v (B, Tk, Hkv, D), H % Hkv == 0.

  Query head h uses key/value head h // (H / Hkv). bias: additive (B, 1, Tq, Tk)
  float32; has_key: (B, 1, Tq, 1), 0 on rows with no allowed key (their output is
  zero). Returns (B, Tq, H * D) and float32 probs (B, H, Tq, Tk).
  """
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  if h % hkv:
    raise ValueError(f"query heads {h} must be a multiple of key/value heads {hkv}")
  g = h // hkv
  # Scale q (B, Tq, H, D), not the (B, H, Tq, Tk) logits: one pass less over the
  # largest tensor in forward and backward (attention backward ~1.6x on CPU).
  qg = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).reshape(b, tq, hkv, g, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32))
  logits = logits.reshape(b, h, tq, tk) + bias
  probs = jax.nn.softmax(logits, axis=-1)
  probs = probs * has_key  # rows with no allowed key: zero, not uniform
  if head_mask is not None:
    probs = masks.apply_head_mask(probs, head_mask)
  pg = probs.reshape(b, hkv, g, tq, tk).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", pg, v)
  return out.reshape(b, tq, h * d), probs


def attend_fused(q, k, v, structure: masks.AttentionStructure, has_key,
                 implementation: str = "xla"):
  """`attend` through jax.nn.dot_product_attention: same q, k, v layout
  (grouped kv heads handled natively by the kernel), the mask given in structured
  form (`masks.attention_structure`), has_key (B, 1, Tq, 1) zeroing rows with no
  allowed key. Returns (B, Tq, H * D); no probabilities."""
  b, tq, h, d = q.shape
  out = jax.nn.dot_product_attention(
      q, k, v, mask=structure.mask, is_causal=structure.is_causal,
      key_value_seq_lengths=structure.key_value_seq_lengths, implementation=implementation)
  out = out * has_key.transpose(0, 2, 1, 3).astype(out.dtype)  # rows with no key -> 0
  return out.reshape(b, tq, h * d)


# ---------------------------------------------------------------------------
# Pallas kernels: splash (TPU) and Triton mha (GPU). Each takes the segment ids of
# `masks.kernel_mask` and its causal flag, never a (T, T) mask, so attention memory
# is linear in T. On a CPU backend each runs in interpret mode (the kernel's own code
# emulated by XLA:CPU); lowering for its accelerator uses the real kernel
# (`lax.platform_dependent` keeps only the branch of the platform lowered for).

def _splash_blocks():
  b = KERNEL_BLOCK
  return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, t: int, causal: bool, interpret: bool):
  """The splash kernel for `heads` query heads over `t` (a multiple of KERNEL_BLOCK)
  positions; built once per shape, outside any trace (its block tables are constants)."""
  with jax.ensure_compile_time_eval():
    static = splash.CausalMask((t, t)) if causal else splash.FullMask((t, t))
    return splash.make_splash_mha(splash.MultiHeadMask([static] * heads), head_shards=1,
                                  q_seq_shards=1, block_sizes=_splash_blocks(),
                                  interpret=interpret)


def _batch_mesh():
  """(mesh, batch axes) of the mesh set around the jitted step (parallel.jit_train_step),
  or None: the kernels then run inside shard_map, one batch shard per device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axes = tuple(a for a in parallel.BATCH_AXES if a in mesh.axis_names)
  if math.prod(mesh.shape[a] for a in axes) == 1:
    return None
  return mesh, axes


def _per_shard(fn, args, specs, batch: int):
  """fn(*args) inside shard_map over the batch axes (specs: the args' specs without the
  batch axis spec, None for a batched array), or fn(*args) when no mesh splits the batch."""
  found = _batch_mesh()
  if found is None:
    return fn(*args)
  mesh, axes = found
  n = math.prod(mesh.shape[a] for a in axes)
  if batch % n:  # e.g. an eval batch's remainder: the whole batch on each device
    return fn(*args)
  row = P(axes)
  in_specs = tuple(row if s is None else s(mesh) for s in specs)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=row, check_vma=False)(*args)


def _splash(q, k, v, seg, causal):
  """q (B, Tp, H, D), k and v (B, Tp, Hkv, D) -> (B, Tp, H, D); grouped kv heads natively."""
  b, tp, h, _ = q.shape
  kernels = (_splash_kernel(h, tp, causal, True), _splash_kernel(h, tp, causal, False))

  def run(kernels, q, k, v, seg):
    def branch(kernel):
      one = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s))  # noqa: E731
      return lambda q, k, v, s: jax.vmap(one)(q, k, v, s)
    return jax.lax.platform_dependent(q, k, v, seg, cpu=branch(kernels[0]),
                                      tpu=branch(kernels[1]))

  heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  splash: [H, T, D] per example
  kernel_spec = lambda mesh: tuple(  # noqa: E731  replicated: no head or q-sequence shards
      kern.manual_sharding_spec(NamedSharding(mesh, P(None, None))) for kern in kernels)
  out = _per_shard(run, (kernels, heads_first(q), heads_first(k), heads_first(v), seg),
                   (kernel_spec, None, None, None, None), b)
  return heads_first(out)


def _triton(q, k, v, seg, causal):
  """q (B, Tp, H, D), k and v (B, Tp, Hkv, D) -> (B, Tp, H, D); kv heads repeated (mha
  has no grouped heads), so query head h uses kv head h // (H / Hkv) as in `attend`."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  blocks = triton_attention.BlockSizes(  # mha's defaults, named: backward tiles of 32
      block_q=KERNEL_BLOCK, block_k=KERNEL_BLOCK, block_q_dkv=32, block_kv_dkv=32,
      block_q_dq=32, block_kv_dq=32)

  def run(q, k, v, seg):
    def branch(interpret):
      return functools.partial(triton_attention.mha, sm_scale=1.0, causal=causal,
                               block_sizes=blocks, interpret=interpret)
    return jax.lax.platform_dependent(q, k, v, seg, cpu=branch(True), cuda=branch(False))
  return _per_shard(run, (q, k, v, seg), (None, None, None, None), q.shape[0])


def attend_kernel(q, k, v, km: masks.KernelMask, implementation: str):
  """`attend` through a Pallas kernel: q (B, T, H, D), k and v (B, T, Hkv, D), the mask
  as `masks.kernel_mask` gives it. T is padded to km's length (the added positions
  are a pad segment), the result cut back; outputs at non-real positions are zeroed
  (the reference gives 0 there too when a row has no key). Returns (B, T, H * D)."""
  b, t, h, d = q.shape
  tp = km.segment_ids.shape[1]
  if tp % KERNEL_BLOCK or tp < t:
    raise ValueError(f"model.attention={implementation!r} needs the sequence padded to a "
                     f"multiple of {KERNEL_BLOCK}, got {tp} positions for T={t}; build the "
                     f"mask with masks.kernel_mask(..., block=model.KERNEL_BLOCK), or use "
                     f"model.attention='einsum', 'xla' or 'cudnn'")
  # Scaled q, as `attend` scales it: the kernels then run with scale 1.
  q = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q.dtype)
  q, k, v = (jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))) for x in (q, k, v))
  run = {"splash": _splash, "triton": _triton}[implementation]
  out = run(q, k, v, km.segment_ids, km.causal)[:, :t]
  out = out * km.real[:, :, None, None].astype(out.dtype)
  return out.reshape(b, t, h * d)


class Attention(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.head_dim
    self.qkv = _linear(cfg, cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * d, rngs,
                       use_bias=cfg.qkv_bias)
    self.out = _linear(cfg, cfg.d_model, cfg.d_model, rngs,
                       std=cfg.init_std / math.sqrt(2 * cfg.n_layers), use_bias=cfg.out_bias)

  def project(self, x, positions):
    """(B, T, d_model) -> q (B, T, H, D), k and v (B, T, Hkv, D); with rope, q and k
    are rotated by `positions` (a cache stores k and v exactly as returned)."""
    b, t, _ = x.shape
    cfg = self.cfg
    d, h, hkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    q, k, v = jnp.split(_dense(self.qkv, x), [h * d, (h + hkv) * d], axis=-1)
    q, k, v = q.reshape(b, t, h, d), k.reshape(b, t, hkv, d), v.reshape(b, t, hkv, d)
    if cfg.pos_encoding == "rope":
      q = apply_rope(q, positions, cfg.rope_base)
      k = apply_rope(k, positions, cfg.rope_base)
    return q, k, v

  def __call__(self, x, bias, has_key, head_mask=None, positions=None):
    if positions is None and self.cfg.pos_encoding == "rope":
      raise ValueError("rope attention needs the (B, T) positions array")
    q, k, v = self.project(x, positions)
    if isinstance(bias, (masks.AttentionStructure, masks.KernelMask)) and head_mask is not None:
      raise ValueError(f"head_mask needs the attention probabilities, which "
                       f"model.attention={self.cfg.attention!r} does not form; use "
                       f"model.attention='einsum'")
    if isinstance(bias, masks.KernelMask):  # Pallas kernel
      out, probs = attend_kernel(q, k, v, bias, self.cfg.attention), None
    elif isinstance(bias, masks.AttentionStructure):  # jax.nn.dot_product_attention
      out, probs = attend_fused(q, k, v, bias, has_key, self.cfg.attention), None
    else:
      out, probs = attend(q, k, v, bias, has_key, head_mask)
    return _dense(self.out, out), probs


def _norm(cfg: DecoderConfig, rngs):
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(cfg.d_model, rngs=rngs, dtype=cfg.compute_dtype, epsilon=cfg.norm_eps)
  return nnx.LayerNorm(cfg.d_model, rngs=rngs, dtype=cfg.compute_dtype, epsilon=cfg.norm_eps)


class Block(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.ln1 = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ln2 = _norm(cfg, rngs)
    width = 2 * cfg.d_ff if cfg.mlp == "swiglu" else cfg.d_ff  # swiglu: [gate | up]
    self.fc1 = _linear(cfg, cfg.d_model, width, rngs, use_bias=cfg.mlp_bias)
    self.fc2 = _linear(cfg, cfg.d_ff, cfg.d_model, rngs,
                       std=cfg.init_std / math.sqrt(2 * cfg.n_layers), use_bias=cfg.mlp_bias)
    self.drop = nnx.Dropout(cfg.dropout)

  def mlp(self, x):
    h = _dense(self.fc1, x)
    if self.cfg.mlp == "swiglu":
      gate, up = jnp.split(h, 2, axis=-1)
      h = jax.nn.silu(gate) * up
    else:
      h = gelu(h, self.cfg.gelu_approximate)
    return _dense(self.fc2, h)

  def __call__(self, x, bias, has_key, head_mask, deterministic, rngs, positions=None):
    a, probs = self.attn(self.ln1(x), bias, has_key, head_mask, positions)
    x = x + self.drop(a, deterministic=deterministic, rngs=rngs)
    m = self.mlp(self.ln2(x))
    x = x + self.drop(m, deterministic=deterministic, rngs=rngs)
    return x, probs


class Decoder(nnx.Module):
  """Decoder-only LM: token (+ learned position) embeddings, pre-norm blocks, LM head."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(cfg.init_std)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, embedding_init=init,
                           dtype=cfg.compute_dtype)
    if cfg.pos_encoding == "learned":
      self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs, embedding_init=init,
                                 dtype=cfg.compute_dtype)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.ln_f = _norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.head = _linear(cfg, cfg.d_model, cfg.vocab_size, rngs, use_bias=cfg.head_bias)
    self.drop = nnx.Dropout(cfg.dropout)

  def embed_inputs(self, inputs, positions):
    """(B, T) ids and positions -> (B, T, d_model) residual stream (before dropout)."""
    x = self.embed(inputs)
    if self.cfg.pos_encoding == "learned":
      x = x + self.pos_embed(positions)
    return x

  def logits(self, x):
    """Final norm and LM head (or the tied embedding): float32 (B, T, V)."""
    x = self.ln_f(x)
    out = _dense(self.embed.attend if self.cfg.tie_embeddings else self.head, x)
    return out.astype(jnp.float32)

  def __call__(self, inputs, *, key_mask=None, positions=None, segment_ids=None,
               head_mask=None, causal: bool = True, return_attention: bool = False,
               deterministic: bool = True, rngs: nnx.Rngs | None = None,
               keys_are_prefix: bool = False, apply_head: bool = True):
    """inputs (B, T) int -> logits (B, T, V) float32 [, list of (B, H, T, T) probs].

    key_mask: (B, T) True on real tokens (default: all real).
    positions: (B, T) int; default: a running count of real tokens, so left and
      right padding give the same positions.
    head_mask: (H,) or (B, H) for every layer, or a list of n_layers such masks.
    deterministic / rngs: dropout off, or on with ``rngs.dropout``.
    keys_are_prefix: static promise that real keys are a prefix of each row (right
      padding, no packing); lets the fused attention paths use sequence lengths.
    apply_head: False returns the final residual stream (B, T, d_model) instead of
      the logits, for a loss that applies `logits` a chunk at a time.
    """
    if inputs.ndim != 2:
      raise ValueError(f"inputs must be (B, T) token ids, got shape {inputs.shape}")
    b, t = inputs.shape
    if t > self.cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len={self.cfg.max_len}; raise "
                       f"model.max_len or shorten the data")
    if key_mask is None:
      key_mask = jnp.ones((b, t), bool)
    key_mask = key_mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)
    impl = self.cfg.attention
    if return_attention and impl != "einsum":  # never a silent switch to another path
      raise ValueError(f"return_attention needs the attention probabilities, which "
                       f"model.attention={impl!r} does not form; build the model with "
                       f"attention='einsum' on the same weights (the audit does)")
    if segment_ids is not None and impl not in HONOURS_SEGMENTS:
      raise ValueError(f"model.attention={impl!r} cannot apply segment ids; "
                       f"packed rows need one of {', '.join(HONOURS_SEGMENTS)}")
    if impl in KERNELS:  # the same mask as segment ids
      bias = masks.kernel_mask(key_mask, segment_ids=segment_ids, causal=causal,
                               block=KERNEL_BLOCK)
      has_key = None
    elif impl != "einsum":  # the same mask in structured form
      bias = masks.attention_structure(key_mask, segment_ids=segment_ids, causal=causal,
                                       keys_are_prefix=keys_are_prefix)
      if segment_ids is not None and bias.mask is None:  # never drop the segment mask
        raise ValueError("packed rows reached the fused attention without their segment "
                         "mask; this is a bug in masks.attention_structure")
      has_key = masks.rows_with_key(key_mask, segment_ids=segment_ids, causal=causal)
    else:
      allowed = masks.attention_mask(key_mask, segment_ids=segment_ids, causal=causal)
      bias = masks.to_bias(allowed, jnp.float32)
      has_key = allowed.any(axis=-1, keepdims=True).astype(jnp.float32)
    x = self.embed_inputs(inputs, positions)
    x = self.drop(x, deterministic=deterministic, rngs=rngs)
    all_probs = []
    per_layer = isinstance(head_mask, (list, tuple))
    if per_layer and len(head_mask) != self.cfg.n_layers:
      raise ValueError(f"a per-layer head_mask needs {self.cfg.n_layers} entries, "
                       f"got {len(head_mask)}")
    if self.cfg.scan_layers and not return_attention and not per_layer:
      x = _scan_blocks(self.blocks, x, bias, has_key, head_mask, deterministic, positions,
                       remat=self.cfg.remat)
    else:
      for i, block in enumerate(self.blocks):
        hm = head_mask[i] if per_layer else head_mask
        if self.cfg.remat and not return_attention:
          x, probs = _remat_block(block, x, bias, has_key, hm, deterministic, positions)
        else:
          x, probs = block(x, bias, has_key, hm, deterministic, rngs, positions)
        if return_attention:
          all_probs.append(probs)
    if not apply_head:
      return x
    logits = self.logits(x)
    if return_attention:
      return logits, all_probs
    return logits


def prefix_forward(model: Decoder, inputs, *, key_mask, causal: bool, positions=None,
                   segment_ids=None, upto=None, **kw):
  """The one forward of token ids: logits (B, T, V) of `model` on `inputs`.

  `step.forward` (training, evaluation), `decode` (generation without a KV cache) and
  the verbs inference-mode loss all go through here, so they see the same masks.
  upto: None, or a column (may be traced): every key after it is hidden
  (`masks.keys_up_to`), so column `upto` is predicted from its prefix alone, as at
  inference, even for a model trained without the causal mask.
  Other keywords go to `Decoder.__call__`.
  """
  if upto is not None:
    key_mask = masks.keys_up_to(key_mask, upto)
  return model(inputs, key_mask=key_mask, positions=positions, segment_ids=segment_ids,
               causal=causal, **kw)


def _remat_block(block, x, bias, has_key, head_mask, deterministic, positions):
  """block(...) with its activations recomputed in the backward pass."""
  if block.cfg.dropout > 0 and not deterministic:
    raise ValueError("model.remat with dropout is not supported; set model.dropout=0")
  gd, st = nnx.split(block)

  @jax.checkpoint
  def run(st, x):  # masks and positions are closed over (the structure holds a static bool)
    return nnx.merge(gd, st)(x, bias, has_key, head_mask, True, None, positions)[0]
  return run(st, x), None


def _scan_blocks(blocks, x, bias, has_key, head_mask, deterministic, positions, *, remat):
  """lax.scan over the blocks. Parameters stay per layer (checkpoints and shardings do
  not change); they are stacked inside the step, which XLA fuses into the scan."""
  if blocks[0].cfg.dropout > 0 and not deterministic:
    raise ValueError("model.scan_layers with dropout is not supported; set model.dropout=0")
  gd, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in blocks])

  def body(x, st):
    return nnx.merge(gd, st)(x, bias, has_key, head_mask, True, None, positions)[0], None
  if remat:
    body = jax.checkpoint(body)
  x, _ = jax.lax.scan(body, x, stacked)
  return x


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
