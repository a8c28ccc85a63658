"""Decoder options: references for RoPE, RMSNorm, grouped attention,
SwiGLU and z-loss, and the masking properties for every option combination that
changes attention or positions, each with a planted-bug twin that must fail."""
import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmmask import batching, losses, masks
from lmmask import model as M
from lmmask import step as step_lib

V = 13  # tiny vocabulary; id 0 is padding


def _cfg(**kw):
  base = dict(vocab_size=V, dropout=0.0, d_model=16, n_layers=2, n_heads=4, d_ff=24, max_len=12, attention="einsum")
  base.update(kw)
  return M.DecoderConfig(**base)


def _model(**kw):
  return M.Decoder(_cfg(**kw), rngs=nnx.Rngs(params=0))


# Every combination that changes attention or positions, plus one "all modern".
# (Norm, MLP and tied embeddings change neither; they ride along in "modern".)
COMBOS = {
    "learned-mha": dict(),
    "learned-gqa": dict(n_kv_heads=2),
    "rope-mha": dict(pos_encoding="rope"),
    "rope-mqa": dict(pos_encoding="rope", n_kv_heads=1),
    "modern": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2,
                   tie_embeddings=True, rope_base=500.0),
}
ROPE_COMBOS = [k for k, v in COMBOS.items() if v.get("pos_encoding") == "rope"]


# ---------------------------------------------------------------------------
# Independent references (plain numpy loops).

def rope_reference(x, positions, base):
  """x (B, T, H, D): rotate pair (i, i + D/2) by positions[b, t] * base**(-2i/D)."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  b_, t_, h_, d = x.shape
  half = d // 2
  for b in range(b_):
    for t in range(t_):
      for h in range(h_):
        for i in range(half):
          theta = positions[b][t] * base ** (-2.0 * i / d)
          c, s = math.cos(theta), math.sin(theta)
          x1, x2 = x[b, t, h, i], x[b, t, h, i + half]
          out[b, t, h, i] = x1 * c - x2 * s
          out[b, t, h, i + half] = x2 * c + x1 * s
  return out


def rope_index_bug(x, positions, base):  # planted bug: rotates by the array index
  idx = jnp.broadcast_to(jnp.arange(x.shape[1]), positions.shape)
  return M.apply_rope(x, idx, base)


def test_rope_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = np.array([[0, 0, 0, 1, 2], [7, 8, 9, 0, 1]])  # left pad; a packing restart
  ref = rope_reference(x, pos, 100.0)
  np.testing.assert_allclose(np.asarray(M.apply_rope(x, pos, 100.0)), ref, atol=1e-5)
  # The twin (angle from the array index, not from `positions`) must fail.
  assert np.abs(np.asarray(rope_index_bug(jnp.asarray(x), jnp.asarray(pos), 100.0))
                - ref).max() > 1e-2
  # Rotation preserves norms and q.k depends only on the position difference.
  np.testing.assert_allclose(np.linalg.norm(ref, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="positions"):
    M.apply_rope(x, pos[:, :3], 100.0)


def rmsnorm_reference(x, scale, eps=1e-6):
  out = np.empty_like(x, dtype=np.float64)
  for idx in np.ndindex(x.shape[:-1]):
    row = x[idx].astype(np.float64)
    out[idx] = row / math.sqrt((row ** 2).mean() + eps) * scale
  return out


def test_rmsnorm_matches_numpy_reference():
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(2, 3, 16)) * 3 + 1).astype(np.float32)
  block = M.Block(_cfg(norm="rmsnorm"), rngs=nnx.Rngs(params=0))
  scale = rng.normal(size=16).astype(np.float32)
  block.ln1.scale.value = jnp.asarray(scale)
  ref = rmsnorm_reference(x, scale)
  np.testing.assert_allclose(np.asarray(block.ln1(x)), ref, rtol=1e-4, atol=1e-5)
  # Twin: LayerNorm (subtracts the mean) on the same input must not match.
  ln = M.Block(_cfg(), rngs=nnx.Rngs(params=0)).ln1
  ln.scale.value = jnp.asarray(scale)
  assert np.abs(np.asarray(ln(x)) - ref).max() > 1e-2


def attend_reference(q, k, v, allowed):
  """Per query head h, key/value head h // (H / Hkv); rows with no key give 0."""
  b_, tq, h_, d = q.shape
  hkv = k.shape[2]
  out = np.zeros((b_, tq, h_, d))
  for b in range(b_):
    for h in range(h_):
      kh = h // (h_ // hkv)
      for i in range(tq):
        keys = [j for j in range(k.shape[1]) if allowed[b, 0, i, j]]
        if not keys:
          continue
        s = np.array([q[b, i, h] @ k[b, j, kh] / math.sqrt(d) for j in keys])
        p = np.exp(s - s.max())
        p /= p.sum()
        out[b, i, h] = sum(pj * v[b, j, kh] for pj, j in zip(p, keys))
  return out.reshape(b_, tq, h_ * d)


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_grouped_attention_matches_numpy_reference(hkv):
  rng = np.random.default_rng(2)
  q = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
  k = rng.normal(size=(2, 5, hkv, 3)).astype(np.float32)
  v = rng.normal(size=(2, 5, hkv, 3)).astype(np.float32)
  key_mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
  allowed = np.asarray(masks.attention_mask(key_mask))
  bias = masks.to_bias(allowed)
  has_key = allowed.any(-1, keepdims=True).astype(np.float32)
  out, _ = M.attend(q, k, v, bias, has_key)
  ref = attend_reference(q, k, v, allowed)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
  if hkv not in (1, 4):  # twin: kv heads tiled (head h -> h % Hkv), not repeated
    g = 4 // hkv
    out_bad, _ = M.attend(q, np.tile(k, (1, 1, g, 1)), np.tile(v, (1, 1, g, 1)), bias, has_key)
    assert np.abs(np.asarray(out_bad) - ref).max() > 1e-2


def test_swiglu_mlp_matches_numpy():
  rng = np.random.default_rng(3)
  block = M.Block(_cfg(mlp="swiglu"), rngs=nnx.Rngs(params=0))
  x = rng.normal(size=(2, 3, 16)).astype(np.float32)
  for lin in (block.fc1, block.fc2):  # O(1) weights so the twin's error is visible
    lin.kernel.value = jnp.asarray(rng.normal(size=lin.kernel.value.shape) * 0.3, jnp.float32)
    lin.bias.value = jnp.asarray(rng.normal(size=lin.bias.value.shape) * 0.3, jnp.float32)
  w1, b1 = np.asarray(block.fc1.kernel.value), np.asarray(block.fc1.bias.value)
  w2, b2 = np.asarray(block.fc2.kernel.value), np.asarray(block.fc2.bias.value)
  h = x @ w1 + b1
  gate, up = h[..., :24], h[..., 24:]
  ref = (gate / (1 + np.exp(-gate)) * up) @ w2 + b2
  np.testing.assert_allclose(np.asarray(block.mlp(x)), ref, rtol=1e-4, atol=1e-5)
  assert w1.shape == (16, 48) and w2.shape == (24, 16)
  twin = (up / (1 + np.exp(-up)) * gate) @ w2 + b2  # gate and up swapped
  assert np.abs(twin - ref).max() > 1e-2


def z_loss_reference(logits, mask, coef):
  num = den = 0.0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1]):
      if mask[b, t]:
        m = logits[b, t].max()
        logz = m + math.log(np.exp(logits[b, t] - m).sum())
        num += logz ** 2
        den += 1
  return coef * num / den


def test_z_loss_matches_numpy_reference():
  rng = np.random.default_rng(4)
  logits = (rng.normal(size=(3, 4, 7)) * 3 + 2).astype(np.float32)
  mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], np.float32)
  ref = z_loss_reference(logits, mask, 1e-4)
  got = float(losses.z_loss(logits, mask, coefficient=1e-4))
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  twin = float(losses.z_loss(logits, np.ones_like(mask), coefficient=1e-4))  # unmasked
  assert abs(twin - ref) > 1e-3 * ref
  assert float(losses.z_loss(logits, 0 * mask, coefficient=1e-4)) == 0.0
  with pytest.raises(ValueError, match="coefficient"):
    losses.z_loss(logits, mask, coefficient=-1.0)


def test_tied_embeddings_share_the_table():
  m = _model(tie_embeddings=True)
  assert not hasattr(m, "head")
  ids = jnp.array([[1, 2, 3]])
  x = m.embed_inputs(ids, jnp.array([[0, 1, 2]]))
  np.testing.assert_allclose(np.asarray(m.logits(x)),
                             np.asarray(m.ln_f(x) @ m.embed.embedding.value.T), atol=1e-5)
  assert M.count_params(m) == M.count_params(_model()) - (16 * V + V)


def test_option_validation():
  for bad, match in [(dict(pos_encoding="alibi"), "pos_encoding"), (dict(norm="batch"), "norm"),
                     (dict(mlp="relu"), "mlp"), (dict(n_kv_heads=3), "n_kv_heads"),
                     (dict(n_kv_heads=8), "n_kv_heads"),
                     (dict(pos_encoding="rope", d_model=12, n_heads=4), "even head dim"),
                     (dict(pos_encoding="rope", rope_base=0.5), "rope_base")]:
    with pytest.raises(ValueError, match=match):
      _cfg(**bad)
  assert _cfg(n_kv_heads=0).kv_heads == 4 and _cfg(n_kv_heads=1).kv_heads == 1


# ---------------------------------------------------------------------------
# Masking properties for every combination, each with a planted-bug twin.

def _ids(seed, b=2, t=9):
  return np.random.default_rng(seed).integers(1, V, size=(b, t)).astype(np.int32)


def _query_index_bug(monkeypatch):
  """Planted position bug: queries rotated by their array index (as a cache that
  forgets its offset does), or, with learned positions, index positions."""
  orig_project = M.Attention.project

  def project(self, x, positions):
    q, k, v = orig_project(self, x, positions)
    if self.cfg.pos_encoding == "rope":
      idx = jnp.broadcast_to(jnp.arange(x.shape[1]), positions.shape)
      q = orig_project(self, x, idx)[0]
    return q, k, v

  orig_embed = M.Decoder.embed_inputs

  def embed_inputs(self, inputs, positions):
    return orig_embed(self, inputs, jnp.broadcast_to(jnp.arange(inputs.shape[1]),
                                                     inputs.shape))

  monkeypatch.setattr(M.Attention, "project", project)
  monkeypatch.setattr(M.Decoder, "embed_inputs", embed_inputs)


def future_leak(model, causal=True):
  ids = _ids(0)
  cut = 4
  other = ids.copy()
  other[:, cut + 1:] = _ids(1)[:, cut + 1:]
  a = model(jnp.asarray(ids), causal=causal)
  b = model(jnp.asarray(other), causal=causal)
  return float(jnp.abs(a[:, :cut + 1] - b[:, :cut + 1]).max())


def pad_leak(model, use_mask=True):
  ids = _ids(2)
  key_mask = np.ones_like(ids, bool)
  key_mask[0, :3] = False   # left padding
  key_mask[1, 6:] = False   # right padding
  other = np.where(key_mask, ids, _ids(3))
  km = jnp.asarray(key_mask) if use_mask else None
  a = model(jnp.asarray(ids), key_mask=km)
  b = model(jnp.asarray(other), key_mask=km)
  return float(jnp.abs(jnp.where(key_mask[..., None], a - b, 0)).max())


def _batch_loss(model, batch):
  logits = model(jnp.asarray(batch.inputs), key_mask=jnp.asarray(batch.key_mask),
                 positions=jnp.asarray(batch.positions),
                 segment_ids=jnp.asarray(batch.segment_ids))
  return float(losses.masked_cross_entropy(logits, batch.targets, batch.loss_mask)[0])


def left_right_gap(model):
  seqs = [[1, 5, 7, 2], [1, 3, 4, 6, 8, 9, 2], [1, 11, 2]]
  left = batching.make_batch(seqs, pad_id=0, length=10, pad_side="left")
  right = batching.make_batch(seqs, pad_side="right", pad_id=0, length=10)
  return abs(_batch_loss(model, left) - _batch_loss(model, right))


def packing_gap(model):
  """Two documents packed in one row give the logits each gets alone."""
  a, b = [1, 5, 7, 9, 2], [1, 3, 4, 2]
  packed = batching.batch_from_segments(np.array([a + b + [0]]),
                                        np.array([[1] * 5 + [2] * 4 + [0]]))
  alone = batching.make_batch([b], pad_id=0, length=10)
  lp = model(jnp.asarray(packed.inputs), key_mask=jnp.asarray(packed.key_mask),
             positions=jnp.asarray(packed.positions),
             segment_ids=jnp.asarray(packed.segment_ids))
  la = model(jnp.asarray(alone.inputs), key_mask=jnp.asarray(alone.key_mask),
             positions=jnp.asarray(alone.positions))
  return float(jnp.abs(lp[0, 5:8] - la[0, :3]).max())


@pytest.fixture(params=sorted(COMBOS))
def combo_model(request):
  # A large init makes attention sharp, so a planted bug moves the logits visibly.
  return _model(init_std=0.5, **COMBOS[request.param])


def test_future_perturbation(combo_model):
  assert future_leak(combo_model) < 1e-5
  assert future_leak(combo_model, causal=False) > 1e-3  # twin: no causal mask


def test_pad_perturbation(combo_model):
  assert pad_leak(combo_model) < 1e-5
  assert pad_leak(combo_model, use_mask=False) > 1e-3  # twin: padding not masked


def test_left_right_padding_same_loss(combo_model, monkeypatch):
  assert left_right_gap(combo_model) < 1e-5
  _query_index_bug(monkeypatch)
  assert left_right_gap(combo_model) > 1e-4  # twin: positions from the array index


def test_packed_segments_restart_positions(combo_model, monkeypatch):
  assert packing_gap(combo_model) < 1e-5
  _query_index_bug(monkeypatch)
  assert packing_gap(combo_model) > 1e-4


def test_batch_from_segments():
  ids = np.array([[1, 5, 7, 1, 3, 4, 0], [1, 2, 3, 4, 5, 6, 7]])
  seg = np.array([[1, 1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3, 3]])
  bt = batching.batch_from_segments(ids, seg)
  np.testing.assert_array_equal(bt.positions, [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(bt.loss_mask, [[1, 1, 0, 1, 1, 0], [1] * 6])
  np.testing.assert_array_equal(bt.key_mask, [[1] * 6, [1] * 6])
  with pytest.raises(ValueError, match="contiguous"):
    batching.batch_from_segments(ids, np.array([[1, 1, 2, 2, 1, 1, 0]] * 2))


@pytest.mark.parametrize("name", ROPE_COMBOS)
def test_cached_query_offset_matches_full_attention(name):
  """What a KV cache does: one new query at its absolute position against keys
  computed earlier equals the full pass's row (left-padded rows, so position !=
  index). Twin: the query rotated at its index in the new-token array (0)."""
  cfg = _cfg(init_std=0.5, **COMBOS[name])
  attn = M.Attention(cfg, rngs=nnx.Rngs(params=1))
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 7, 16)), jnp.float32)
  key_mask = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7], bool))
  pos = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)
  allowed = masks.attention_mask(key_mask)
  full, _ = attn(x, masks.to_bias(allowed), allowed.any(-1, keepdims=True).astype(jnp.float32),
                 positions=pos)
  _, k, v = attn.project(x, pos)  # the cache: rotated keys and values
  worst = twin_worst = 0.0
  for t in range(2, 7):
    step_mask = masks.key_padding_mask(key_mask) & masks.causal_mask(1, 7, q_offset=t)
    has_key = step_mask.any(-1, keepdims=True).astype(jnp.float32)
    for qpos, record in ((pos[:, t:t + 1], "ok"), (jnp.zeros((2, 1), jnp.int32), "bug")):
      q, _, _ = attn.project(x[:, t:t + 1], qpos)
      out, _ = M.attend(q, k, v, masks.to_bias(step_mask), has_key)
      gap = float(jnp.abs(attn.out(out)[:, 0] - full[:, t]).max())
      if record == "ok":
        worst = max(worst, gap)
      else:
        twin_worst = max(twin_worst, gap)
  assert worst < 1e-5
  assert twin_worst > 1e-3


def test_train_step_reports_z_loss_apart():
  """metrics["loss"] is the cross-entropy alone; z_loss is its own metric and is
  in the gradient (the same step without it has another gradient norm)."""
  import jax
  from conftest import tiny_config

  from lmmask.data import pipeline, verbs
  cfg = tiny_config(**{"model.dropout": 0.0, "loss.z_loss": 0.5})
  corpus = verbs.build_corpus()
  split = pipeline.pad_split(corpus.train, length=cfg.data.length, pad_id=0, pad_side="right")
  batch = pipeline.train_batch(split, step=0, batch_size=8, seed=0, pad_id=0)
  state = step_lib.create_train_state(cfg, jax.random.PRNGKey(0), vocab_size=len(corpus.vocab),
                                      keys_are_prefix=True)
  ce = step_lib.eval_step(state, batch)
  logits = step_lib.forward(state, state.params, batch, deterministic=True)
  z = losses.z_loss(logits, batch.loss_mask, coefficient=0.5)
  step = jax.jit(step_lib.train_step)
  _, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), float(ce["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["z_loss"]), float(z), rtol=1e-5)
  assert float(z) > 1e-3
  _, m0 = step(state.replace(options=dataclasses.replace(state.options, z_loss=0.0)), batch)
  assert "z_loss" not in m0
  assert float(m0["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-6)
  assert abs(float(m0["grad_norm"]) - float(metrics["grad_norm"])) > 1e-4
