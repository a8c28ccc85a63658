"""Decoder properties: causality, pad invariance, finite outputs, padding-side invariance.

Each property has a planted-bug twin that must FAIL the same check, so the check
can tell a correct model from a broken one.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmmask import losses, masks
from lmmask import model as model_lib
from lmmask.batching import make_batch
from lmmask.model import Decoder, DecoderConfig

V, PAD = 23, 0
CFG = DecoderConfig(vocab_size=V, dropout=0.0, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=12,
                    attention="einsum")


@pytest.fixture(scope="module")
def model():
  return Decoder(CFG, rngs=nnx.Rngs(0))


@nnx.jit(static_argnames="causal")
def _jit_forward(model, inputs, key_mask, causal):
  return model(inputs, key_mask=key_mask, causal=causal)


def forward(model, inputs, key_mask, causal=True):
  return np.asarray(_jit_forward(model, jnp.asarray(inputs), jnp.asarray(key_mask), causal))


def max_future_leak(model, causal=True, seed=0):
  """Largest change of logits at positions < t when inputs at >= t change."""
  rng = np.random.default_rng(seed)
  x = rng.integers(1, V, (3, 9))
  km = np.ones_like(x, bool)
  base = forward(model, x, km, causal)
  worst = 0.0
  for t in range(1, x.shape[1]):
    y = x.copy()
    y[:, t:] = rng.integers(1, V, y[:, t:].shape)
    worst = max(worst, np.abs(forward(model, y, km, causal)[:, :t] - base[:, :t]).max())
  return worst


def max_pad_leak(model, ignore_key_mask=False, seed=0):
  """Largest change of real-position logits when pad-position tokens change."""
  rng = np.random.default_rng(seed)
  b = make_batch([[1, 5, 6, 7, 2], [1, 9, 2], [1, 4, 4, 4, 4, 4, 4, 2]], pad_id=PAD,
                 pad_side="left")
  km = np.ones_like(b.key_mask) if ignore_key_mask else b.key_mask
  base = forward(model, b.inputs, km)
  worst = 0.0
  for _ in range(3):
    x = np.where(b.key_mask, b.inputs, rng.integers(1, V, b.inputs.shape))
    out = forward(model, x, km)
    worst = max(worst, np.abs(out - base)[b.key_mask].max())
  return worst


def test_causality_future_tokens_do_not_change_the_past(model):
  assert max_future_leak(model) < 1e-6


def test_planted_bug_non_causal_model_leaks(model):
  assert max_future_leak(model, causal=False) > 1e-3


def test_pad_tokens_do_not_change_real_positions(model):
  assert max_pad_leak(model) < 1e-6


def test_planted_bug_pad_left_unmasked_leaks(model):
  assert max_pad_leak(model, ignore_key_mask=True) > 1e-3


def test_attention_is_lower_triangular_and_zero_on_pad_keys(model):
  b = make_batch([[1, 5, 6, 2], [1, 9, 9, 9, 9, 2]], pad_id=PAD, pad_side="left")
  _, probs = model(jnp.asarray(b.inputs), key_mask=jnp.asarray(b.key_mask),
                   return_attention=True)
  assert len(probs) == CFG.n_layers
  allowed = np.asarray(masks.attention_mask(b.key_mask))  # (B, 1, T, T)
  for p in probs:
    p = np.asarray(p)
    assert p.shape == (2, CFG.n_heads, 5, 5)
    assert np.abs(p * ~allowed).max() == 0.0
    assert np.abs(np.triu(p, k=1)).max() == 0.0
    rows = allowed.any(-1)[:, :, :, None]
    np.testing.assert_allclose(p.sum(-1, keepdims=True)[np.broadcast_to(rows, p.shape[:3] + (1,))],
                               1.0, rtol=1e-5)


def test_left_padding_gives_finite_outputs(model):
  b = make_batch([[1, 2], [1, 3, 4, 5, 6, 7, 2]], pad_id=PAD, pad_side="left")
  out = forward(model, b.inputs, b.key_mask)
  assert np.isfinite(out).all()
  g = jax.grad(lambda m: model_loss(m, b))(model)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_planted_bug_bias_added_twice_gives_nan(monkeypatch, model):
  """Adding two finfo.min biases overflows to -inf: rows with no key become NaN."""
  orig = masks.to_bias
  monkeypatch.setattr(model_lib.masks, "to_bias", lambda m, d: orig(m, d) + orig(m, d))
  b = make_batch([[1, 2], [1, 3, 4, 5, 6, 7, 2]], pad_id=PAD, pad_side="left")
  # Eager call: a cached jit of the correct model would hide the patch.
  out = model(jnp.asarray(b.inputs), key_mask=jnp.asarray(b.key_mask))
  assert np.isnan(np.asarray(out)).any()


def model_loss(model, b, reduction="token_mean"):
  logits = model(jnp.asarray(b.inputs), key_mask=jnp.asarray(b.key_mask),
                 positions=jnp.asarray(b.positions))
  return losses.masked_cross_entropy(logits, b.targets, b.loss_mask, reduction=reduction)[0]


SEQS = [[1, 5, 6, 7, 2], [1, 9, 2], [1, 4, 8, 4, 8, 4, 8, 2], [1, 3, 3, 2]]


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
def test_left_and_right_padding_give_the_same_loss(model, reduction):
  right = make_batch(SEQS, pad_id=PAD, pad_side="right")
  left = make_batch(SEQS, pad_id=PAD, pad_side="left")
  np.testing.assert_allclose(float(model_loss(model, right, reduction)),
                             float(model_loss(model, left, reduction)), rtol=1e-5)


def test_planted_bug_loss_mask_from_inputs_breaks_padding_invariance(model):
  right = make_batch(SEQS, pad_id=PAD, pad_side="right")
  left = make_batch(SEQS, pad_id=PAD, pad_side="left")
  bug_r = right.replace(loss_mask=right.key_mask.astype(np.float32))
  bug_l = left.replace(loss_mask=left.key_mask.astype(np.float32))
  assert abs(float(model_loss(model, bug_r)) - float(model_loss(model, bug_l))) > 1e-3


def test_planted_bug_positions_from_index_breaks_padding_invariance(model):
  """Positions must count real tokens; plain arange positions depend on padding."""
  right = make_batch(SEQS, pad_id=PAD, pad_side="right")
  left = make_batch(SEQS, pad_id=PAD, pad_side="left")
  ar = np.broadcast_to(np.arange(left.shape[1]), left.shape)
  bug_l = left.replace(positions=ar)
  assert abs(float(model_loss(model, right)) - float(model_loss(model, bug_l))) > 1e-4


def test_head_mask_zeroes_a_heads_contribution(model):
  x = jnp.asarray(np.random.default_rng(0).integers(1, V, (2, 6)))
  _, probs = model(x, head_mask=jnp.array([1.0, 0.0]), return_attention=True)
  assert float(jnp.abs(probs[0][:, 1]).max()) == 0.0
  full = model(x)
  masked = model(x, head_mask=jnp.array([1.0, 0.0]))
  assert float(jnp.abs(full - masked).max()) > 1e-4
  per_layer = model(x, head_mask=[jnp.ones(2), jnp.ones(2)])
  np.testing.assert_allclose(np.asarray(per_layer), np.asarray(full), atol=1e-6)


def test_segment_ids_block_cross_document_attention(model):
  x = np.random.default_rng(2).integers(1, V, (1, 8))
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 2]])
  pos = np.array([[0, 1, 2, 0, 1, 2, 3, 4]])
  packed = np.asarray(model(jnp.asarray(x), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos)))
  second = np.asarray(model(jnp.asarray(x[:, 3:])))
  np.testing.assert_allclose(packed[:, 3:], second, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(n_layers=0), "positive"),
    (dict(dropout=1.5), "dropout"),
    (dict(dtype="float64"), "dtype"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DecoderConfig(**{"vocab_size": 10, "dropout": 0.0, "attention": "einsum", **kwargs})


def test_too_long_input_is_refused(model):
  with pytest.raises(ValueError, match="max_len"):
    model(jnp.ones((1, CFG.max_len + 1), jnp.int32))


def test_bfloat16_compute_stays_finite_under_left_padding():
  cfg = DecoderConfig(vocab_size=V, dropout=0.0, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=12,
                      dtype="bfloat16", attention="einsum")
  m = Decoder(cfg, rngs=nnx.Rngs(1))
  b = make_batch([[1, 2], [1, 3, 4, 5, 6, 7, 2]], pad_id=PAD, pad_side="left")
  out = m(jnp.asarray(b.inputs), key_mask=jnp.asarray(b.key_mask))
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


def test_prefix_forward_column_sees_only_its_prefix_even_without_the_causal_mask(model):
  """prefix_forward(upto=t) at column t == the non-causal model run on tokens 0..t alone;
  the full non-causal forward (no upto) differs there (its column t sees the future)."""
  x = np.random.default_rng(1).integers(1, V, (2, 7))
  km = np.ones_like(x, bool)
  for t in (2, 5):
    got = model_lib.prefix_forward(model, jnp.asarray(x), key_mask=jnp.asarray(km),
                                   causal=False, upto=t)
    alone = forward(model, x[:, :t + 1], km[:, :t + 1], causal=False)
    np.testing.assert_allclose(np.asarray(got)[:, t], alone[:, t], atol=1e-5)
    full = forward(model, x, km, causal=False)
    assert np.abs(full[:, t] - alone[:, t]).max() > 1e-3
