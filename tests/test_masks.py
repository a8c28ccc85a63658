"""lmmask.masks against plain numpy double loops."""
import jax.numpy as jnp
import numpy as np
import pytest

from lmmask import masks


def loop_mask(key_mask, segment_ids=None, causal=True, q_offset=None):
  key_mask = np.asarray(key_mask, bool)
  b, t = key_mask.shape
  out = np.zeros((b, 1, t, t), bool)
  for n in range(b):
    for i in range(t):
      for j in range(t):
        ok = bool(key_mask[n, j])
        if causal and j > i:
          ok = False
        if segment_ids is not None:
          s = np.asarray(segment_ids)
          if s[n, i] != s[n, j] or s[n, j] == 0:
            ok = False
        out[n, 0, i, j] = ok
  return out


def random_key_mask(rng, b=4, t=7):
  km = rng.random((b, t)) > 0.3
  km[0] = True           # no padding
  km[1, :3] = False      # left padding
  km[2, 4:] = False      # right padding
  return km


def test_causal_mask_matches_loop():
  got = np.asarray(masks.causal_mask(5))
  assert got.shape == (1, 1, 5, 5) and got.dtype == bool
  for i in range(5):
    for j in range(5):
      assert got[0, 0, i, j] == (j <= i)


def check_bottom_right_aligned(causal_mask, offset):
  """A cached query block of 2 after `offset` earlier keys sees every key up to itself."""
  q, kv = 2, offset + 2
  got = np.asarray(causal_mask(q, kv, q_offset=offset))
  assert got.shape == (1, 1, q, kv)
  for i in range(q):
    for j in range(kv):
      assert got[0, 0, i, j] == (j <= offset + i), (offset, i, j)


@pytest.mark.parametrize("offset", [0, 3, 6])
def test_causal_mask_with_query_offset_is_bottom_right_aligned(offset):
  check_bottom_right_aligned(masks.causal_mask, offset)


def test_causal_mask_per_row_offsets():
  offs = np.array([0, 2, 5])
  got = np.asarray(masks.causal_mask(1, 8, q_offset=offs))
  assert got.shape == (3, 1, 1, 8)
  for b, o in enumerate(offs):
    np.testing.assert_array_equal(got[b, 0, 0], np.arange(8) <= o)


def top_left_causal_mask(q_len, kv_len=None, *, q_offset=0):
  """Planted bug: jax's is_causal alignment (query i sees keys 0..i), which ignores the
  query's offset in a cache."""
  kv_len = q_len if kv_len is None else kv_len
  return jnp.asarray(np.tril(np.ones((q_len, kv_len), bool)))[None, None]


@pytest.mark.parametrize("offset", [3, 6])
def test_planted_bug_top_left_alignment_is_wrong_with_offset(offset):
  """The offset test catches a top-left aligned mask whenever the query sits later."""
  check_bottom_right_aligned(top_left_causal_mask, 0)  # the two agree without an offset
  with pytest.raises(AssertionError):
    check_bottom_right_aligned(top_left_causal_mask, offset)


def test_key_padding_mask_shape_and_values():
  km = np.array([[True, True, False], [False, True, True]])
  got = np.asarray(masks.key_padding_mask(km))
  assert got.shape == (2, 1, 1, 3)
  np.testing.assert_array_equal(got[:, 0, 0], km)


def test_segment_mask_matches_loop():
  seg = np.array([[1, 1, 2, 2, 0], [1, 2, 2, 3, 3]])
  got = np.asarray(masks.segment_mask(seg))
  assert got.shape == (2, 1, 5, 5)
  ref = loop_mask(np.ones_like(seg, bool), seg, causal=False)
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_segments", [False, True])
def test_attention_mask_equals_double_loop(causal, with_segments):
  rng = np.random.default_rng(0)
  km = random_key_mask(rng)
  seg = rng.integers(0, 3, km.shape) if with_segments else None
  got = np.asarray(masks.attention_mask(km, segment_ids=seg, causal=causal))
  np.testing.assert_array_equal(got, loop_mask(km, seg, causal))


def test_planted_bug_non_causal_mask_differs_from_reference():
  km = np.ones((1, 4), bool)
  wrong = np.asarray(masks.attention_mask(km, causal=False))
  assert not np.array_equal(wrong, loop_mask(km, causal=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_to_bias_values(dtype):
  m = np.array([[True, False], [False, True]])
  bias = masks.to_bias(m, dtype)
  assert bias.dtype == dtype
  np.testing.assert_array_equal(np.asarray(bias[m], np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(bias[~m], np.float32),
                                float(jnp.finfo(dtype).min))
  assert np.isfinite(np.asarray(bias, np.float32)).all()


def test_to_bias_rejects_float_masks():
  with pytest.raises(ValueError, match="boolean"):
    masks.to_bias(np.ones((2, 2), np.float32))


def test_attention_bias_is_finite_and_one_shot():
  """Combining as booleans first: no -inf even where several masks disallow."""
  km = np.array([[False, True, True, False]])
  bias = np.asarray(masks.attention_bias(km, dtype=jnp.bfloat16), np.float32)
  assert bias.shape == (1, 1, 4, 4)
  assert np.isfinite(bias).all()
  assert set(np.unique(bias)) == {0.0, float(jnp.finfo(jnp.bfloat16).min)}
  # Planted bug: adding two f32 biases overflows to -inf; casting f32 min to bf16 too.
  two = masks.to_bias(masks.causal_mask(4), jnp.float32) + masks.to_bias(
      masks.key_padding_mask(km), jnp.float32)
  assert np.isinf(np.asarray(two)).any()
  assert np.isinf(np.asarray(jnp.asarray(jnp.finfo(jnp.float32).min).astype(jnp.bfloat16)))


def test_broadcast_to_heads():
  km = np.ones((3, 5), bool)
  bias = masks.attention_bias(km)
  logits = jnp.zeros((3, 4, 5, 5))
  assert (logits + bias).shape == (3, 4, 5, 5)


def test_apply_head_mask_shapes_and_values():
  rng = np.random.default_rng(1)
  probs = rng.random((2, 3, 4, 4)).astype(np.float32)
  hm = np.array([1.0, 0.0, 0.5], np.float32)
  got = np.asarray(masks.apply_head_mask(probs, hm))
  for b in range(2):
    for h in range(3):
      np.testing.assert_allclose(got[b, h], probs[b, h] * hm[h])
  hm2 = np.array([[1, 0, 1], [0, 1, 1]], np.float32)
  got2 = np.asarray(masks.apply_head_mask(probs, hm2))
  for b in range(2):
    for h in range(3):
      np.testing.assert_allclose(got2[b, h], probs[b, h] * hm2[b, h])
  with pytest.raises(ValueError, match="head_mask must have shape"):
    masks.apply_head_mask(probs, np.ones(4))


def loop_keys_up_to(key_mask, last):
  km = np.asarray(key_mask, bool)
  return np.array([[bool(km[b, j]) and j <= last for j in range(km.shape[1])]
                   for b in range(km.shape[0])])


def test_keys_up_to_matches_loop_and_an_off_by_one_twin_fails():
  rng = np.random.default_rng(3)
  km = rng.random((3, 9)) > 0.3
  for last in range(9):
    want = loop_keys_up_to(km, last)
    np.testing.assert_array_equal(np.asarray(masks.keys_up_to(jnp.asarray(km), last)), want)
    twin = km & (np.arange(9)[None, :] < last)  # hides column `last` itself
    assert (twin != want).any() or not km[:, last].any()
  with pytest.raises(ValueError, match=r"\(B, T\)"):
    masks.keys_up_to(jnp.ones((9,), bool), 3)
