"""Autoregressive generation with a KV cache (greedy, temperature, top-k, top-p).

Prompts are left-padded to a common length P, so every row's last prompt token
sits in the same column and the generated tokens of all rows share cache slots
P, P+1, ... The cache has S = P + max_new_tokens slots per layer.

Masks come from `lmmask.masks` only: key padding (left pads are never keys) AND
``causal_mask(q_len, S, q_offset=slot)``, which is bottom-right aligned: the query
written at cache slot ``slot + i`` may see slots ``0 .. slot + i``. (jax's
``is_causal=True`` is top-left aligned and would let the one decode query see
only slot 0.)

Positions follow `Decoder`: a running count of real tokens, so a left-padded
prompt gets the same positions as the unpadded one.

The cached step runs the model's own pieces in the order of `lmmask.model.Block`:
`Attention.project` (q and already-rotated k, v of the new tokens), the cache
update, `model.attend` over all cached keys, the output projection, `Block.mlp`,
and `Decoder.embed_inputs` / `Decoder.logits` around the blocks (with fallbacks
for a decoder without those methods). tests/test_decode.py checks it against the
full forward pass at every step, so a change to the block shows up there.

A KV cache is only exact for causally trained models: in a model trained without
the causal mask, earlier positions' keys and values change when a token is
appended. For such models `generate` recomputes the whole (bidirectional) prefix
at every step instead (``use_cache=None`` picks this automatically).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmmask import masks
from lmmask import model as model_lib


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray           # (B, N) int32 generated ids; pad_id after a row's eos
  lengths: np.ndarray          # (B,) tokens generated per row, eos included
  prompt_ids: np.ndarray       # (B, P) left-padded prompts
  logits: np.ndarray | None    # (B, N, V) float32 next-token logits, if requested


# ---------------------------------------------------------------------------
# Sampling filters.

def filter_logits(logits, *, top_k: int | None = None, top_p: float | None = None):
  """Set logits outside the top-k / nucleus (top-p) set to -inf.

  top_k: keep tokens whose logit is >= the k-th largest (ties at the boundary kept).
  top_p: keep the smallest prefix of tokens sorted by probability whose total mass
    reaches p (a token is kept if the mass strictly before it is < p); the most
    likely token is always kept. Applied after top_k when both are given.
  """
  logits = jnp.asarray(logits, jnp.float32)
  neg = jnp.asarray(-jnp.inf, jnp.float32)
  if top_k is not None:
    v = logits.shape[-1]
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
      raise ValueError(f"top_k must be a positive int (or None), got {top_k!r}")
    k = min(int(top_k), v)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, neg)
  if top_p is not None:
    if not 0.0 < float(top_p) <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
    logits = jnp.where(keep, logits, neg)
  return logits


def select_next(logits, rng, *, temperature: float, top_k=None, top_p=None):
  """Greedy argmax for temperature 0, otherwise a sample from the filtered softmax."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = jnp.asarray(logits, jnp.float32) / temperature
  return jax.random.categorical(rng, filter_logits(scaled, top_k=top_k, top_p=top_p),
                                axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# The cached forward pass.

def _check_model(model):
  needed = ("embed", "blocks", "ln_f", "cfg")
  missing = [n for n in needed if not hasattr(model, n)]
  if missing:
    raise ValueError(f"generate needs an lmmask.model.Decoder (missing {missing}); pass a "
                     f"TrainState or a Decoder")


def _project(attn, x, positions):
  """q (B, T, H, D), k and v (B, T, Hkv, D), with rotary positions if the model has them."""
  if hasattr(attn, "project"):
    return attn.project(x, positions)
  b, t, _ = x.shape
  h = attn.cfg.n_heads
  d = attn.cfg.d_model // h
  q, k, v = jnp.split(attn.qkv(x), 3, axis=-1)
  return tuple(a.reshape(b, t, h, d) for a in (q, k, v))


def _block_cached(block, x, positions, k_cache, v_cache, slot, key_valid):
  """One Block on the queries x (B, Tq, D) written at cache slots slot..slot+Tq-1.

  The cache holds keys/values as (B, S, Hkv, D), exactly as the attention projects
  them (already rotated for rotary models).
  """
  tq = x.shape[1]
  attn = block.attn
  q, k, v = _project(attn, block.ln1(x), positions)
  k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, slot, 0, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, slot, 0, 0))
  s = k_cache.shape[1]
  allowed = masks.key_padding_mask(key_valid) & masks.causal_mask(tq, s, q_offset=slot)
  has_key = allowed.any(axis=-1, keepdims=True).astype(jnp.float32)
  out, _ = model_lib.attend(q, k_cache, v_cache, masks.to_bias(allowed, jnp.float32), has_key)
  x = x + attn.out(out)
  h = block.ln2(x)
  if hasattr(block, "mlp"):
    m = block.mlp(h)
  else:
    m = block.fc2(jax.nn.gelu(block.fc1(h), approximate=block.cfg.gelu_approximate))
  return x + m, k_cache, v_cache


def _cached_forward(model, tokens, positions, cache, slot, key_valid):
  """tokens/positions (B, Tq) at slots slot.. -> (logits (B, Tq, V), new cache)."""
  if hasattr(model, "embed_inputs"):
    x = model.embed_inputs(tokens, positions)
  else:
    x = model.embed(tokens) + model.pos_embed(positions)
  new_cache = []
  for block, (kc, vc) in zip(model.blocks, cache):
    x, kc, vc = _block_cached(block, x, positions, kc, vc, slot, key_valid)
    new_cache.append((kc, vc))
  if hasattr(model, "logits"):
    return model.logits(x), new_cache
  return model.head(model.ln_f(x)).astype(jnp.float32), new_cache


def init_cache(model, batch: int, slots: int):
  cfg = model.cfg
  d = cfg.d_model // cfg.n_heads
  shape = (batch, slots, getattr(cfg, "kv_heads", cfg.n_heads), d)
  return [(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
          for _ in range(cfg.n_layers)]


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill(graphdef, params, prompt, prompt_mask, positions, slots):
  model = nnx.merge(graphdef, params)
  b, p = prompt.shape
  key_valid = jnp.concatenate([prompt_mask, jnp.ones((b, slots - p), bool)], axis=1)
  logits, cache = _cached_forward(model, prompt, positions, init_cache(model, b, slots), 0,
                                  key_valid)
  return logits[:, -1], cache, key_valid


@functools.partial(jax.jit, static_argnums=(0,))
def _step_cached(graphdef, params, cache, token, position, slot, key_valid):
  model = nnx.merge(graphdef, params)
  logits, cache = _cached_forward(model, token[:, None], position[:, None], cache, slot,
                                  key_valid)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0, 5))
def _step_recompute(graphdef, params, ids, key_mask, last, causal):
  """Full forward over the whole (B, S) buffer, keys after column `last` hidden."""
  model = nnx.merge(graphdef, params)
  cols = jnp.arange(ids.shape[1])[None, :]
  km = key_mask & (cols <= last)
  logits = model(ids, key_mask=km, causal=causal)
  return jax.lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False)


_select_jit = jax.jit(select_next, static_argnames=("temperature", "top_k", "top_p"))


# ---------------------------------------------------------------------------
# The public entry point.

def _unpack(state_or_model, causal):
  if hasattr(state_or_model, "graphdef") and hasattr(state_or_model, "params"):
    graphdef, params = state_or_model.graphdef, state_or_model.params
    state_causal = bool(getattr(state_or_model, "causal", True))
    if causal is not None and bool(causal) != state_causal:
      raise ValueError(f"causal={causal} contradicts the TrainState (trained with "
                       f"causal={state_causal}); leave causal=None")
    causal = state_causal
  elif isinstance(state_or_model, nnx.Module):
    graphdef, params = nnx.split(state_or_model)
    causal = True if causal is None else bool(causal)
  else:
    raise ValueError(f"generate needs a TrainState or an lmmask Decoder, got "
                     f"{type(state_or_model).__name__}")
  model = nnx.merge(graphdef, params)
  _check_model(model)
  return graphdef, params, causal, model.cfg


def left_pad_prompts(prompts, *, pad_id: int, multiple: int = 1) -> np.ndarray:
  """A list of token-id lists (or a left-padded (B, P) array) -> a (B, P) int32 array.

  List prompts are left-padded to a multiple of `multiple` tokens (fewer distinct
  shapes, fewer compilations; extra left padding changes no logit).
  """
  if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
    arr = np.asarray(prompts)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"prompts must be a (B, P) integer array or a list of id lists, got "
                       f"dtype {arr.dtype} shape {arr.shape}")
    real = arr != pad_id
    if not real[:, -1].all():
      raise ValueError("prompts must be LEFT-padded (the last column real in every row); "
                       "use batching.pad_sequences(..., pad_side='left')")
    if (np.diff(real.astype(np.int8), axis=1) < 0).any():
      raise ValueError("prompts have a pad token after a real token; they must be "
                       "left-padded with no gaps")
    return arr.astype(np.int32)
  if not isinstance(prompts, (list, tuple)) or not prompts:
    raise ValueError("prompts must be a non-empty list of token-id lists")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token "
                       f"(e.g. <bos>)")
    if pad_id in list(p):
      raise ValueError(f"prompt {i} contains pad_id={pad_id}; pass unpadded prompts")
  longest = max(len(p) for p in prompts)
  longest = -(-longest // multiple) * multiple
  out = np.full((len(prompts), longest), pad_id, np.int32)
  for i, p in enumerate(prompts):
    out[i, longest - len(p):] = np.asarray(p, np.int32)
  return out


def generate(state_or_model, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, rng=None,
             eos_id: int | None, pad_id: int = 0, causal: bool | None = None,
             use_cache: bool | None = None, return_logits: bool = False) -> Generation:
  """Continue each prompt by up to `max_new_tokens` tokens.

  Args:
    state_or_model: a `train.TrainState` (its `causal` flag is used) or a `Decoder`.
    prompts: list of token-id lists (padded here, on the left) or a left-padded
      (B, P) array.
    temperature: 0.0 is greedy (deterministic, rng unused); > 0 samples from
      softmax(logits / temperature) after the top_k / top_p filters.
    rng: a jax PRNG key, required when temperature > 0.
    eos_id: a row stops after emitting it (later tokens are pad_id); None: never.
    use_cache: True: KV cache; False: recompute the whole prefix every step;
      None: the cache for causal models, recompute for non-causal ones.
    return_logits: also return the (B, N, V) logits each token was chosen from.
  """
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  temperature = float(temperature)
  if temperature < 0 or not math.isfinite(temperature):
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.PRNGKey(seed)")
  if temperature == 0 and (top_k is not None or top_p is not None):
    raise ValueError("top_k/top_p only apply when sampling; set temperature > 0")
  graphdef, params, causal, cfg = _unpack(state_or_model, causal)
  if use_cache is None:
    use_cache = causal
  if use_cache and not causal:
    raise ValueError("a KV cache is exact only for a causal model; use use_cache=False "
                     "(recompute the prefix) for a model trained with causal=False")
  prompt = left_pad_prompts(prompts, pad_id=pad_id, multiple=8)
  if prompt.max() >= cfg.vocab_size or prompt.min() < 0:
    raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size})")
  b, p = prompt.shape
  prompt_mask = prompt != pad_id
  n_real = prompt_mask.sum(axis=1).astype(np.int32)
  if int(n_real.max()) + max_new_tokens - 1 > cfg.max_len:
    raise ValueError(f"a prompt of {int(n_real.max())} tokens plus max_new_tokens="
                     f"{max_new_tokens} needs positions beyond the model's max_len="
                     f"{cfg.max_len}; lower max_new_tokens")
  positions = np.maximum(np.cumsum(prompt_mask, axis=1) - 1, 0).astype(np.int32)
  slots = p + max_new_tokens
  if rng is None:
    rng = jax.random.PRNGKey(0)
  sel = functools.partial(_select_jit, temperature=temperature, top_k=top_k,
                          top_p=None if top_p is None else float(top_p))

  if use_cache:
    logits, cache, key_valid = _prefill(graphdef, params, jnp.asarray(prompt),
                                        jnp.asarray(prompt_mask), jnp.asarray(positions), slots)
  else:
    buf = np.full((b, slots), pad_id, np.int32)
    buf[:, :p] = prompt
    buf_mask = np.zeros((b, slots), bool)
    buf_mask[:, :p] = prompt_mask
    logits = _step_recompute(graphdef, params, jnp.asarray(buf), jnp.asarray(buf_mask),
                             p - 1, causal)

  tokens = np.full((b, max_new_tokens), pad_id, np.int32)
  all_logits = [] if return_logits else None
  done = np.zeros(b, bool)
  lengths = np.zeros(b, np.int32)
  for s in range(max_new_tokens):
    if return_logits:
      all_logits.append(np.asarray(logits))
    nxt = np.asarray(sel(logits, jax.random.fold_in(rng, s)))
    nxt = np.where(done, pad_id, nxt).astype(np.int32)
    tokens[:, s] = nxt
    lengths += ~done
    if eos_id is not None:
      done |= nxt == eos_id
    if done.all() or s == max_new_tokens - 1:
      break
    if use_cache:
      logits, cache = _step_cached(graphdef, params, cache, jnp.asarray(nxt),
                                   jnp.asarray(n_real + s), p + s, key_valid)
    else:
      buf[:, p + s] = nxt
      buf_mask[:, p + s] = True
      logits = _step_recompute(graphdef, params, jnp.asarray(buf), jnp.asarray(buf_mask),
                               p + s, causal)
  out_logits = None
  if return_logits:
    out_logits = np.zeros((b, max_new_tokens, cfg.vocab_size), np.float32)
    out_logits[:, :len(all_logits)] = np.stack(all_logits, axis=1)
  return Generation(tokens=tokens, lengths=lengths, prompt_ids=prompt, logits=out_logits)


def strip_after_eos(row: Sequence[int], *, eos_id: int | None, pad_id: int = 0) -> list[int]:
  """Generated ids up to (not including) the first eos, pads dropped."""
  out = []
  for t in row:
    t = int(t)
    if eos_id is not None and t == eos_id:
      break
    if t != pad_id:
      out.append(t)
  return out
