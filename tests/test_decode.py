"""KV-cache decoding: parity with the full forward pass, padding, determinism, filters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decoder_options import COMBOS

from lmmask import decode, masks
from lmmask.model import Decoder, DecoderConfig

V = 23
PROMPTS = [[1, 5, 6, 7], [1], [1, 9, 10], [1, 4, 12, 3, 8, 6]]


@pytest.fixture(scope="module")
def model():
  # A large init std makes the random model's logits far from uniform, so a wrong
  # mask or position shows up as a large logit difference.
  cfg = DecoderConfig(vocab_size=V, dropout=0.0, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=16,
                      init_std=0.3, attention="einsum")
  return Decoder(cfg, rngs=nnx.Rngs(params=3))


def full_forward_logits(model, gen):
  """Logits of one full (teacher-forced) forward pass over prompt + generated tokens."""
  ids = np.concatenate([gen.prompt_ids, gen.tokens], axis=1)
  key_mask = np.concatenate([gen.prompt_ids != 0, np.ones_like(gen.tokens, bool)], axis=1)
  logits = np.asarray(model(jnp.asarray(ids), key_mask=jnp.asarray(key_mask)))
  p, n = gen.prompt_ids.shape[1], gen.tokens.shape[1]
  return logits[:, p - 1:p - 1 + n]


def max_parity_error(model, **kw):
  gen = decode.generate(model, PROMPTS, max_new_tokens=8, eos_id=None, return_logits=True,
                        **kw)
  return np.abs(full_forward_logits(model, gen) - gen.logits).max()


def test_kv_cache_logits_match_full_forward_every_step(model):
  assert max_parity_error(model) < 1e-5
  assert max_parity_error(model, temperature=1.0, rng=jax.random.PRNGKey(0)) < 1e-5


@pytest.mark.parametrize("name", sorted(COMBOS))
def test_kv_cache_parity_with_decoder_options(name):
  """Every decoder option that changes attention or positions (rotary positions,
  grouped-query / multi-query attention, and the all-options "modern" model)."""
  cfg = DecoderConfig(vocab_size=V, dropout=0.0, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=16,
                      init_std=0.3, attention="einsum", **COMBOS[name])
  m = Decoder(cfg, rngs=nnx.Rngs(params=4))
  assert max_parity_error(m) < 1e-5
  batch = decode.generate(m, PROMPTS, max_new_tokens=6, eos_id=None, return_logits=True)
  one = decode.generate(m, [PROMPTS[1]], max_new_tokens=6, eos_id=None, return_logits=True)
  np.testing.assert_allclose(one.logits[0], batch.logits[1], atol=1e-5)


def test_planted_top_left_causal_mask_breaks_parity(model, monkeypatch):
  """Twin: a cache that ignores q_offset (jax's top-left is_causal) must fail parity."""
  real = masks.causal_mask

  def top_left(q_len, kv_len=None, *, q_offset=0):
    return real(q_len, kv_len)

  def clear():  # the jitted cache steps traced the real mask; drop their compiled code
    decode._prefill.clear_cache()
    decode._decode_loop.clear_cache()

  clear()
  monkeypatch.setattr(masks, "causal_mask", top_left)
  try:
    assert max_parity_error(model) > 1e-2
  finally:
    monkeypatch.undo()
    clear()
  assert max_parity_error(model) < 1e-5


def test_recompute_path_matches_cache(model):
  a = decode.generate(model, PROMPTS, max_new_tokens=6, eos_id=None, return_logits=True)
  b = decode.generate(model, PROMPTS, max_new_tokens=6, eos_id=None, return_logits=True,
                      use_cache=False)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)


def test_left_padded_batch_equals_one_prompt_at_a_time(model):
  batch = decode.generate(model, PROMPTS, max_new_tokens=7, eos_id=None, return_logits=True)
  for i, p in enumerate(PROMPTS):
    one = decode.generate(model, [p], max_new_tokens=7, eos_id=None, return_logits=True)
    np.testing.assert_array_equal(one.tokens[0], batch.tokens[i])
    np.testing.assert_allclose(one.logits[0], batch.logits[i], atol=1e-5)


def test_eos_stops_a_row_and_pads_the_rest(model):
  free = decode.generate(model, PROMPTS, max_new_tokens=8, eos_id=None)
  eos = int(free.tokens[0, 2])  # pretend the 3rd token of row 0 is <eos>
  gen = decode.generate(model, PROMPTS, max_new_tokens=8, eos_id=eos)
  for r in range(len(PROMPTS)):
    row = free.tokens[r].tolist()
    stop = row.index(eos) + 1 if eos in row else 8
    assert gen.tokens[r, :stop].tolist() == row[:stop]
    assert (gen.tokens[r, stop:] == 0).all()
    assert gen.lengths[r] == stop
  assert decode.strip_after_eos(gen.tokens[0], eos_id=eos) == free.tokens[0, :2].tolist()


def test_greedy_is_deterministic_and_sampling_follows_the_key(model):
  a = decode.generate(model, PROMPTS, max_new_tokens=8, eos_id=None)
  b = decode.generate(model, PROMPTS, max_new_tokens=8, eos_id=None)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  # greedy picks the argmax of the logits it reports
  g = decode.generate(model, PROMPTS, max_new_tokens=8, eos_id=None, return_logits=True)
  np.testing.assert_array_equal(g.tokens, g.logits.argmax(-1))
  s = [decode.generate(model, PROMPTS, max_new_tokens=8, eos_id=None, temperature=2.0,
                       rng=jax.random.PRNGKey(k)).tokens for k in (0, 0, 1)]
  np.testing.assert_array_equal(s[0], s[1])
  assert (s[0] != s[2]).any()
  # top_k=1 sampling is greedy whatever the key
  k1 = decode.generate(model, PROMPTS, max_new_tokens=8, eos_id=None, temperature=1.5,
                       top_k=1, rng=jax.random.PRNGKey(7))
  np.testing.assert_array_equal(k1.tokens, a.tokens)


# ---------------------------------------------------------------------------
# top-k / top-p filters against plain numpy loops.

def ref_filter(logits, top_k, top_p):
  out = np.array(logits, np.float64)
  for r in range(out.shape[0]):
    row = out[r]
    if top_k is not None:
      kth = sorted(row, reverse=True)[min(top_k, len(row)) - 1]
      for j in range(len(row)):
        if row[j] < kth:
          row[j] = -np.inf
    if top_p is not None:
      finite = np.isfinite(row)
      probs = np.zeros(len(row))
      probs[finite] = np.exp(row[finite] - row[finite].max())
      probs /= probs.sum()
      order = sorted(range(len(row)), key=lambda j: -row[j])
      acc, keep = 0.0, set()
      for n, j in enumerate(order):
        if n == 0 or acc < top_p:
          keep.add(j)
        acc += probs[j]
      for j in range(len(row)):
        if j not in keep:
          row[j] = -np.inf
  return out


@pytest.mark.parametrize("top_k,top_p", [(None, None), (1, None), (4, None), (50, None),
                                         (None, 0.3), (None, 0.9), (None, 1.0), (5, 0.6)])
def test_filter_logits_matches_reference(top_k, top_p):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 17)) * 2.0
  got = np.asarray(decode.filter_logits(jnp.asarray(logits, jnp.float32), top_k=top_k,
                                        top_p=top_p))
  want = ref_filter(logits.astype(np.float32), top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def nucleus_is_minimal(logits, kept, p):
  """The kept set holds >= p of the mass and dropping its least likely token loses that."""
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for r in range(logits.shape[0]):
    mass = probs[r][kept[r]].sum()
    smallest = probs[r][kept[r]].min()
    if mass < p - 1e-6 or (kept[r].sum() > 1 and mass - smallest >= p + 1e-6):
      return False
  return True


def buggy_top_p(logits, top_p):
  """Twin: keeps tokens whose inclusive cumulative mass is <= p (one token short)."""
  order = jnp.argsort(-logits, axis=-1)
  probs = jax.nn.softmax(jnp.take_along_axis(logits, order, -1), -1)
  keep_sorted = jnp.cumsum(probs, -1) <= top_p
  keep = jnp.zeros_like(keep_sorted).at[
      tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def test_top_p_minimal_nucleus_property_and_twin():
  rng = np.random.default_rng(1)
  logits = (rng.normal(size=(64, 12)) * 1.5).astype(np.float32)
  for p in (0.2, 0.5, 0.8, 0.95):
    kept = np.isfinite(np.asarray(decode.filter_logits(jnp.asarray(logits), top_p=p)))
    assert nucleus_is_minimal(logits, kept, p)
    twin = np.isfinite(np.asarray(buggy_top_p(jnp.asarray(logits), p)))
    assert not nucleus_is_minimal(logits, twin, p)


def test_bad_inputs_raise_clear_errors(model):
  with pytest.raises(ValueError, match="LEFT-padded"):
    decode.generate(model, np.array([[1, 5, 0]]), max_new_tokens=2, eos_id=None)
  with pytest.raises(ValueError, match="rng"):
    decode.generate(model, PROMPTS, max_new_tokens=2, eos_id=None, temperature=1.0)
  with pytest.raises(ValueError, match="temperature > 0"):
    decode.generate(model, PROMPTS, max_new_tokens=2, eos_id=None, top_k=3)
  with pytest.raises(ValueError, match="max_len"):
    decode.generate(model, PROMPTS, max_new_tokens=14, eos_id=None)
  with pytest.raises(ValueError, match="causal"):
    decode.generate(model, PROMPTS, max_new_tokens=2, eos_id=None, causal=False,
                    use_cache=True)
  with pytest.raises(ValueError, match="empty"):
    decode.generate(model, [[1], []], max_new_tokens=2, eos_id=None)
  with pytest.raises(ValueError, match="top_p"):
    decode.filter_logits(jnp.zeros((1, 4)), top_p=1.5)


# ---------------------------------------------------------------------------
# The compiled loop against a plain Python loop: a full forward per token, the same
# selection (decode.select_next, key fold_in(rng, step)) and the same stop rules.

@nnx.jit
def _full_forward(model, ids, key_mask):
  return model(ids, key_mask=key_mask)


def reference_generate(model, prompts, n, *, stops=(), temperature=0.0, top_k=None, top_p=None,
                       rng=None, pad_id=0):
  p = max(len(x) for x in prompts)
  ids = np.full((len(prompts), p + n), pad_id, np.int32)
  real = np.zeros(ids.shape, bool)
  for i, x in enumerate(prompts):
    ids[i, p - len(x):p] = x
    real[i, p - len(x):p] = True
  tokens = np.full((len(prompts), n), pad_id, np.int32)
  lengths = np.zeros(len(prompts), np.int32)
  done = np.zeros(len(prompts), bool)
  for s in range(n):
    logits = _full_forward(model, jnp.asarray(ids), jnp.asarray(real))[:, p - 1 + s]
    key = jax.random.fold_in(rng if rng is not None else jax.random.PRNGKey(0), s)
    nxt = np.asarray(decode.select_next(logits, key, temperature=temperature, top_k=top_k,
                                        top_p=top_p))
    nxt = np.where(done, pad_id, nxt)
    tokens[:, s], lengths = nxt, lengths + ~done
    done |= np.isin(nxt, list(stops))
    ids[:, p + s], real[:, p + s] = nxt, True
    if done.all():
      break
  return tokens, lengths


RAGGED = [[1, 5, 6, 7, 2, 9, 11, 3, 4], [1], [1, 9, 10], [1, 4, 12, 3, 8, 6]]  # P = 9 -> 16


@pytest.mark.parametrize("name,sampling", [
    ("learned-mha", dict()),
    ("learned-mha", dict(temperature=1.3, top_k=6, top_p=0.9, rng=jax.random.PRNGKey(5))),
    ("modern", dict()),  # rope, GQA, tied head, RMSNorm, SwiGLU
    ("modern", dict(temperature=0.8, rng=jax.random.PRNGKey(2))),
])
def test_compiled_loop_gives_the_reference_loop_tokens(name, sampling):
  cfg = DecoderConfig(vocab_size=V, dropout=0.0, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                      max_len=24, init_std=0.3, attention="einsum", **COMBOS[name])
  m = Decoder(cfg, rngs=nnx.Rngs(params=4))
  free = decode.generate(m, RAGGED, max_new_tokens=8, eos_id=None, **sampling)
  want, want_len = reference_generate(m, RAGGED, 8, **sampling)
  np.testing.assert_array_equal(free.tokens, want)
  np.testing.assert_array_equal(free.lengths, want_len)
  # end of text in the middle of the batch: row 0 stops at its 3rd token, others
  # on their own (or never); a chat end-of-turn given as a stop id ends a row the same way
  eos, turn_end = int(free.tokens[0, 2]), int(free.tokens[2, 4])
  gen = decode.generate(m, RAGGED, max_new_tokens=8, eos_id=eos, stop_ids=[turn_end],
                        **sampling)
  want, want_len = reference_generate(m, RAGGED, 8, stops=(eos, turn_end), **sampling)
  np.testing.assert_array_equal(gen.tokens, want)
  np.testing.assert_array_equal(gen.lengths, want_len)
  assert gen.lengths[0] <= 3 and gen.lengths[2] <= 5 and (gen.tokens[0, 3:] == 0).all()
  assert decode.strip_after_eos(gen.tokens[2], eos_id=eos, stop_ids=[turn_end]) == [
      int(t) for t in want[2, :want_len[2] - 1]] or want_len[2] == 8


def test_a_batch_that_stops_early_runs_no_more_steps(model):
  """Every row stopped at step 1: the loop ends, later logits stay unwritten (zero)."""
  first = decode.generate(model, [[1, 5]], max_new_tokens=8, eos_id=None, return_logits=True)
  gen = decode.generate(model, [[1, 5]], max_new_tokens=8, eos_id=int(first.tokens[0, 0]),
                        return_logits=True)
  assert gen.lengths.tolist() == [1] and (gen.logits[:, 1:] == 0).all()
  assert np.abs(gen.logits[:, 0]).max() > 0


def test_bfloat16_weights_agree_with_float32(model):
  """Half the weight bytes per step; the same greedy tokens on this model, logits close."""
  a = decode.generate(model, PROMPTS, max_new_tokens=8, eos_id=None, return_logits=True)
  b = decode.generate(model, PROMPTS, max_new_tokens=8, eos_id=None, return_logits=True,
                      weights_dtype="bfloat16")
  assert (a.tokens == b.tokens).mean() >= 0.9
  assert np.abs(a.logits[:, 0] - b.logits[:, 0]).max() < 0.1 * np.abs(a.logits[:, 0]).max()
  with pytest.raises(ValueError, match="weights_dtype"):
    decode.generate(model, PROMPTS, max_new_tokens=2, eos_id=None, weights_dtype="fp8")


def test_stop_ids_outside_the_vocabulary_are_refused(model):
  with pytest.raises(ValueError, match="stop_ids"):
    decode.generate(model, PROMPTS, max_new_tokens=2, eos_id=None, stop_ids=[V])
