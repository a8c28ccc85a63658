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
and `Decoder.embed_inputs` / `Decoder.logits` around the blocks.
tests/test_decode.py checks it against the full forward pass at every step, so a
change to the block shows up there.

A KV cache is only exact for causally trained models: in a model trained without
the causal mask, earlier positions' keys and values change when a token is
appended. For such models `generate` recomputes the whole (bidirectional) prefix
at every step instead (``use_cache=None`` picks this automatically), through
`model.prefix_forward`, the forward that training and evaluation use.

After the prefill, generation is one jitted `lax.while_loop` (`_decode_loop`):
sampling runs on device with the key fold_in(rng, step), the KV cache is donated
and updated in place, rows stop on their own stop tokens, the loop ends when all
rows have stopped, and the tokens come to the host once. On a 2-core CPU the
Python loop it replaced (two jitted calls and a host round trip per token) spent
a large share of a batch-1 step outside the model.
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
  if not isinstance(model, model_lib.Decoder):
    raise ValueError(f"generate needs an lmmask.model.Decoder, got {type(model).__name__}; "
                     f"pass a TrainState or a Decoder")


def _block_cached(block, x, positions, k_cache, v_cache, slot, key_valid):
  """One Block on the queries x (B, Tq, D) written at cache slots slot..slot+Tq-1.

  The cache holds keys/values as (B, S, Hkv, D), exactly as the attention projects
  them (already rotated for rotary models); the update is a dynamic_update_slice
  of a loop-carried (or donated) buffer, which XLA performs in place.
  """
  tq = x.shape[1]
  attn = block.attn
  q, k, v = attn.project(block.ln1(x), positions)
  k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, slot, 0, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, slot, 0, 0))
  s = k_cache.shape[1]
  allowed = masks.key_padding_mask(key_valid) & masks.causal_mask(tq, s, q_offset=slot)
  has_key = allowed.any(axis=-1, keepdims=True).astype(jnp.float32)
  out, _ = model_lib.attend(q, k_cache, v_cache, masks.to_bias(allowed, jnp.float32), has_key)
  x = x + model_lib._dense(attn.out, out)
  return x + block.mlp(block.ln2(x)), k_cache, v_cache


def _cached_forward(model, tokens, positions, cache, slot, key_valid):
  """tokens/positions (B, Tq) at slots slot.. -> (logits (B, Tq, V), new cache)."""
  x = model.embed_inputs(tokens, positions)
  new_cache = []
  for block, (kc, vc) in zip(model.blocks, cache):
    x, kc, vc = _block_cached(block, x, positions, kc, vc, slot, key_valid)
    new_cache.append((kc, vc))
  return model.logits(x), new_cache


def init_cache(model, batch: int, slots: int):
  cfg = model.cfg
  shape = (batch, slots, cfg.kv_heads, cfg.head_dim)
  return [(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
          for _ in range(cfg.n_layers)]


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill(graphdef, params, prompt, prompt_mask, positions, slots):
  """The prompt through the model once: last-column logits, the filled cache, and the
  (B, S) keys a decoding query may see (real prompt tokens and every generated slot)."""
  model = nnx.merge(graphdef, params)
  b, p = prompt.shape
  key_valid = jnp.concatenate([prompt_mask, jnp.ones((b, slots - p), bool)], axis=1)
  logits, cache = _cached_forward(model, prompt, positions, init_cache(model, b, slots), 0,
                                  key_valid)
  return logits[:, -1], cache, key_valid


def _recompute_last(model, ids, key_mask, last, causal):
  """Logits of column `last` of the (B, S) buffer, every later key hidden."""
  logits = model_lib.prefix_forward(model, ids, key_mask=key_mask, causal=causal, upto=last)
  return jax.lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _prefill_recompute(graphdef, params, buf, buf_mask, last, causal):
  return _recompute_last(nnx.merge(graphdef, params), buf, buf_mask, last, causal)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "steps", "temperature", "top_k", "top_p",
                              "return_logits", "causal"),
    donate_argnames=("state",))
def _decode_loop(graphdef, params, logits, state, rng, stops, pad_id, n_real, limit, *,
                 steps, temperature, top_k, top_p, return_logits, causal):
  """Every generation step in one compiled program.

  Step s picks token s from `logits` (those of the previous step, the prefill's for
  s = 0) with the key fold_in(rng, s); a finished row (it emitted a stop token)
  gets pad_id from then on. Step s >= 1 first feeds token s-1 to the model:
  `state` is (cache, key mask (B, S), None) for a KV cache, updated in place, or
  (None, key mask, ids (B, S)) for a full recompute of the buffer (a non-causal
  model). The loop ends after `steps` tokens or when every
  row has finished, or after `limit` (<= steps, traced: budgets that round to the
  same `steps` share one compilation) tokens. Returns tokens (B, steps), lengths (B,), if asked the
  (B, steps, V) logits each token was chosen from (zero after the loop ended),
  and the final state.
  """
  model = nnx.merge(graphdef, params)
  b = logits.shape[0]
  p = state[1].shape[1] - steps  # prompt width: the buffers hold P + steps slots

  def choose(s, logits, tokens, lengths, done, all_logits):
    if return_logits:
      all_logits = jax.lax.dynamic_update_slice(all_logits, logits[:, None].astype(jnp.float32),
                                                (0, s, 0))
    nxt = select_next(logits, jax.random.fold_in(rng, s), temperature=temperature,
                      top_k=top_k, top_p=top_p)
    nxt = jnp.where(done, pad_id, nxt).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, s))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (nxt[:, None] == stops[None, :]).any(axis=-1)
    return nxt, tokens, lengths, done, all_logits

  def advance(state, tok, s):  # feed token s (chosen at step s) at slot p + s
    cache, key_valid, buf = state
    if cache is not None:
      logits, cache = _cached_forward(model, tok[:, None], (n_real + s)[:, None], cache, p + s,
                                      key_valid)
      return logits[:, 0], (cache, key_valid, buf)
    buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (0, p + s))
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((b, 1), bool), (0, p + s))
    return _recompute_last(model, buf, key_valid, p + s, causal), (cache, key_valid, buf)

  tokens = jnp.full((b, steps), pad_id, jnp.int32)
  all_logits = jnp.zeros((b, steps, logits.shape[-1]), jnp.float32) if return_logits else None
  nxt, tokens, lengths, done, all_logits = choose(
      0, logits, tokens, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), all_logits)

  def cond(carry):
    s, done = carry[0], carry[4]
    return (s < limit) & ~done.all()

  def body(carry):
    s, nxt, state, tokens, done, lengths, all_logits = carry
    logits, state = advance(state, nxt, s - 1)
    nxt, tokens, lengths, done, all_logits = choose(s, logits, tokens, lengths, done, all_logits)
    return s + 1, nxt, state, tokens, done, lengths, all_logits

  carry = (jnp.ones((), jnp.int32), nxt, state, tokens, done, lengths, all_logits)
  _, _, state, tokens, _, lengths, all_logits = jax.lax.while_loop(cond, body, carry)
  # The final cache is returned (and dropped by the caller) so the donated input
  # buffers alias it: the loop then updates them in place, with no copy on entry.
  return tokens, lengths, all_logits, state


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


def cast_weights(state_or_model, dtype: str) -> model_lib.Decoder:
  """The model with its weights cast to `dtype` and computing in it: "bfloat16"
  halves the bytes a decoding step reads. Cast once and pass the result to
  `generate` (its `weights_dtype` argument casts on every call)."""
  graphdef, params, _, cfg = _unpack(state_or_model, None)
  if dtype not in model_lib._DTYPES:
    raise ValueError(f"weights_dtype must be None or one of {sorted(model_lib._DTYPES)}, "
                     f"got {dtype!r}")
  new_cfg = dataclasses.replace(cfg, dtype=dtype)
  graphdef = nnx.split(nnx.eval_shape(lambda: model_lib.Decoder(new_cfg, rngs=nnx.Rngs(0))))[0]
  dt = model_lib._DTYPES[dtype]
  return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dt), params))


def _stop_array(eos_id, stop_ids, vocab_size):
  stops = [] if eos_id is None else [eos_id]
  stops += [] if stop_ids is None else list(stop_ids)
  for t in stops:
    if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size:
      raise ValueError(f"eos_id and stop_ids must be token ids in [0, {vocab_size}), got "
                       f"{t!r}")
  stops = sorted(set(int(t) for t in stops))
  # Padded with -1 (never a token) to a multiple of 4, so eos_id=None, one eos and a
  # few stop ids share one compiled loop.
  width = max(4, -(-len(stops) // 4) * 4)
  return jnp.asarray(stops + [-1] * (width - len(stops)), jnp.int32)


def generate(state_or_model, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, rng=None,
             eos_id: int | None, pad_id: int = 0, causal: bool | None = None,
             use_cache: bool | None = None, return_logits: bool = False,
             stop_ids: Sequence[int] | None = None,
             weights_dtype: str | None = None) -> Generation:
  """Continue each prompt by up to `max_new_tokens` tokens.

  Prefill, then every step in one compiled loop (`_decode_loop`): sampling on
  device, the cache updated in place, one transfer to the host at the end.

  Args:
    state_or_model: a `train.TrainState` (its `causal` flag is used) or a `Decoder`.
    prompts: list of token-id lists (padded here, on the left) or a left-padded
      (B, P) array.
    temperature: 0.0 is greedy (deterministic, rng unused); > 0 samples from
      softmax(logits / temperature) after the top_k / top_p filters.
    rng: a jax PRNG key, required when temperature > 0; token s uses fold_in(rng, s).
    eos_id: a row stops after emitting it (later tokens are pad_id); None: never.
    stop_ids: more token ids that stop a row like eos_id (e.g. a chat template's
      end-of-turn); the stop token is kept and counted in `lengths`.
    use_cache: True: KV cache; False: recompute the whole prefix every step;
      None: the cache for causal models, recompute for non-causal ones.
    return_logits: also return the (B, N, V) logits each token was chosen from.
    weights_dtype: None (the weights as stored) or "bfloat16" / "float32": cast the
      weights and compute in that dtype (attention softmax and logits stay float32);
      see `cast_weights` to cast once for many calls.
  """
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  max_new_tokens = int(max_new_tokens)
  temperature = float(temperature)
  if temperature < 0 or not math.isfinite(temperature):
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.PRNGKey(seed)")
  if temperature == 0 and (top_k is not None or top_p is not None):
    raise ValueError("top_k/top_p only apply when sampling; set temperature > 0")
  if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
    raise ValueError(f"top_k must be a positive int (or None), got {top_k!r}")
  if top_p is not None and not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
  graphdef, params, causal, cfg = _unpack(state_or_model, causal)
  if use_cache is None:
    use_cache = causal
  if use_cache and not causal:
    raise ValueError("a KV cache is exact only for a causal model; use use_cache=False "
                     "(recompute the prefix) for a model trained with causal=False")
  stops = _stop_array(eos_id, stop_ids, cfg.vocab_size)
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
  if weights_dtype is not None:
    graphdef, params = nnx.split(cast_weights(nnx.merge(graphdef, params), weights_dtype))
  positions = np.maximum(np.cumsum(prompt_mask, axis=1) - 1, 0).astype(np.int32)
  # Budgets are rounded up to a multiple of 8 (more cache slots, never keys: no logit
  # changes), so nearby budgets share one compiled loop.
  steps = -(-max_new_tokens // 8) * 8
  slots = p + steps
  if rng is None:
    rng = jax.random.PRNGKey(0)

  if use_cache:
    logits, cache, key_valid = _prefill(graphdef, params, jnp.asarray(prompt),
                                        jnp.asarray(prompt_mask), jnp.asarray(positions), slots)
    state = (cache, key_valid, None)
  else:
    buf = np.full((b, slots), pad_id, np.int32)
    buf[:, :p] = prompt
    buf_mask = np.zeros((b, slots), bool)
    buf_mask[:, :p] = prompt_mask
    buf, buf_mask = jnp.asarray(buf), jnp.asarray(buf_mask)
    logits = _prefill_recompute(graphdef, params, buf, buf_mask, p - 1, causal)
    state = (None, buf_mask, buf)
  tokens, lengths, all_logits, _ = _decode_loop(
      graphdef, params, logits, state, rng, stops, jnp.int32(pad_id), jnp.asarray(n_real),
      jnp.int32(max_new_tokens), steps=steps, temperature=temperature, top_k=None if top_k is None else int(top_k),
      top_p=None if top_p is None else float(top_p), return_logits=return_logits,
      causal=causal)
  tokens, lengths, all_logits = jax.device_get((tokens, lengths, all_logits))
  n = max_new_tokens
  return Generation(tokens=np.asarray(tokens)[:, :n], lengths=np.asarray(lengths),
                    prompt_ids=prompt,
                    logits=None if all_logits is None else np.asarray(all_logits)[:, :n])


def strip_after_eos(row: Sequence[int], *, eos_id: int | None, pad_id: int = 0,
                    stop_ids: Sequence[int] = ()) -> list[int]:
  """Generated ids up to (not including) the first eos or stop id, pads dropped."""
  stops = set(int(t) for t in stop_ids) | ({int(eos_id)} if eos_id is not None else set())
  out = []
  for t in row:
    t = int(t)
    if t in stops:
      break
    if t != pad_id:
      out.append(t)
  return out
