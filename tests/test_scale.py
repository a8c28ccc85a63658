"""Scale features (single process, 1 device): exact reductions under splitting, gradient
accumulation, packing, the structured attention form and the fused attention path,
remat/scan, mesh arithmetic. The 8-device checks live in test_mesh.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmmask import config as config_lib
from lmmask import losses, masks, parallel
from lmmask.batching import batch_from_ids, pad_sequences
from lmmask.data import packing, text
from lmmask.model import Decoder, DecoderConfig

V = 23
PAD = 0


def _skewed_ids(rng, b=16, length=12, steps=4):
  """Rows i::steps get very different lengths: micro-batch 0 long, the others tiny."""
  seqs = []
  for r in range(b):
    n = length if r % steps == 0 else int(rng.integers(2, 4))
    seqs.append(list(rng.integers(1, V, size=n)))
  seqs[1] = [5]  # a row with no counted target at all (1 real token)
  ids = pad_sequences([s if len(s) >= 1 else [1] for s in seqs], pad_id=PAD, length=length)
  return ids


# ---------------------------------------------------------------------------
# losses.token_weights: sum(w * nll) is the reduction, for any split.

def _np_reduce(nll, mask, reduction):
  """Independent reference with plain loops."""
  b, t = mask.shape
  total = sum(nll[i, j] * mask[i, j] for i in range(b) for j in range(t))
  toks = [sum(mask[i]) for i in range(b)]
  counted = [i for i in range(b) if toks[i] > 0]
  if reduction == "token_mean":
    return total / sum(toks) if sum(toks) else 0.0
  if reduction == "seq_mean":
    return total / len(counted) if counted else 0.0
  if reduction == "seq_mean_of_means":
    if not counted:
      return 0.0
    return sum(sum(nll[i, j] * mask[i, j] for j in range(t)) / toks[i] for i in counted) / len(counted)
  return total


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
def test_token_weights_match_reference_and_split_exactly(reduction):
  rng = np.random.default_rng(0)
  mask = (rng.random((8, 10)) < 0.4).astype(np.float32)
  mask[3] = 0
  nll = rng.random((8, 10)).astype(np.float32) * 3
  w = np.asarray(losses.token_weights(mask, reduction))
  whole = float((w * nll).sum())
  assert whole == pytest.approx(_np_reduce(nll, mask, reduction), rel=1e-5)
  assert whole == pytest.approx(float(losses.reduce_loss(jnp.asarray(nll * mask),
                                                          jnp.asarray(mask), reduction)), rel=1e-5)
  # Any split into micro-batches of rows sums to the whole: weights come from the global mask.
  parts = sum(float((w[i::4] * nll[i::4]).sum()) for i in range(4))
  assert parts == pytest.approx(whole, rel=1e-5)
  # Planted bug: reduce each micro-batch on its own, then average -> not the whole.
  if reduction != "sum":
    naive = np.mean([_np_reduce(nll[i::4], mask[i::4], reduction) for i in range(4)])
    assert abs(naive - whole) > 1e-3


def test_token_weights_all_zero_mask_is_zero():
  for r in losses.REDUCTIONS:
    assert float(np.abs(losses.token_weights(np.zeros((2, 3)), r)).sum()) == 0.0
  with pytest.raises(ValueError, match="unknown reduction"):
    losses.token_weights(np.ones((2, 3)), "mean")


# ---------------------------------------------------------------------------
# Gradient accumulation (1 device): skewed micro-batches equal one batch.

def _model(**kw):
  cfg = DecoderConfig(vocab_size=V, dropout=0.0, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16,
                      **{"attention": "einsum", **kw})
  return Decoder(cfg, rngs=nnx.Rngs(params=jax.random.PRNGKey(1)))


def _jit_apply(model, **static):
  """model(inputs, **arrays, **static) jitted (eager nnx is slow op by op)."""
  gd, st = nnx.split(model)
  f = jax.jit(lambda st, inputs, kw: nnx.merge(gd, st)(inputs, **kw, **static))
  return lambda inputs, **kw: f(st, inputs, kw)


def _logits_fn(graphdef):
  def f(p, mb, rng):
    return nnx.merge(graphdef, p)(mb.inputs, key_mask=mb.key_mask, positions=mb.positions,
                                  segment_ids=mb.segment_ids)
  return f


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_of_means"])
def test_accumulation_equals_one_batch(reduction):
  ids = _skewed_ids(np.random.default_rng(1))
  batch = batch_from_ids(ids, pad_id=PAD)
  per_micro = [float(batch.loss_mask[i::4].sum()) for i in range(4)]
  assert max(per_micro) > 5 * min(per_micro)  # the split really is skewed
  gd, params = nnx.split(_model(), nnx.Param)
  run = jax.jit(lambda p, b, s: losses.loss_and_grads(_logits_fn(gd), p, b,
                                                          reduction=reduction, steps=s),
                static_argnums=2)
  loss1, g1, m1 = run(params, batch, 1)
  loss4, g4, m4 = run(params, batch, 4)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  for k in ("nll_sum", "num_tokens", "num_seqs", "num_correct"):
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-6)
  # Reference: the plain loss of the whole batch.
  logits = _logits_fn(gd)(params, batch, None)
  ref, _ = losses.masked_cross_entropy(logits, batch.targets, batch.loss_mask, reduction=reduction)
  np.testing.assert_allclose(loss1, ref, rtol=1e-5)
  # Planted bug: averaging per-micro-batch token means is NOT the big-batch loss.
  if reduction == "token_mean":
    naive = np.mean([float(losses.masked_cross_entropy(
        logits[i::4], batch.targets[i::4], batch.loss_mask[i::4])[0]) for i in range(4)])
    assert abs(naive - float(loss1)) > 1e-3


def test_accumulation_rejects_uneven_split():
  batch = batch_from_ids(_skewed_ids(np.random.default_rng(2), b=6), pad_id=PAD)
  with pytest.raises(ValueError, match="grad_accum_steps"):
    losses.split_micro_batches(batch, 4)


# ---------------------------------------------------------------------------
# Packing.

def _docs(rng, n=7, lo=2, hi=9):
  return [list(rng.integers(1, V, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def _np_packed_reference(ids, seg):
  """Loops: positions restart per segment; a target counts only inside its segment."""
  b, L = ids.shape
  pos = np.zeros((b, L - 1), np.int32)
  lm = np.zeros((b, L - 1), np.float32)
  for r in range(b):
    p = 0
    for j in range(L - 1):
      if seg[r, j] == 0:
        continue
      p = 0 if j == 0 or seg[r, j - 1] != seg[r, j] else p + 1
      pos[r, j] = p
      lm[r, j] = float(seg[r, j + 1] == seg[r, j])
  return pos, lm


def test_pack_batch_matches_loop_reference():
  docs = _docs(np.random.default_rng(3))
  b, dropped = packing.pack_batch(docs, length=16, pad_id=PAD)
  assert dropped == []
  ids_full, seg_full, _ = packing.pack_documents(docs, length=16, pad_id=PAD)
  pos, lm = _np_packed_reference(ids_full, seg_full)
  np.testing.assert_array_equal(b.positions, pos)
  np.testing.assert_array_equal(b.loss_mask, lm)
  # Every document is in exactly one row, and counts len - 1 targets.
  assert int(b.loss_mask.sum()) == sum(len(d) - 1 for d in docs)
  assert sorted(len(d) for d in docs) == sorted(
      int((seg_full[r] == s).sum()) for r in range(len(seg_full)) for s in range(1, seg_full.max() + 1)
      if (seg_full[r] == s).any())


def test_pack_errors_and_dropping():
  with pytest.raises(ValueError, match="raise data.length"):
    packing.pack_documents([[1] * 20], length=16, pad_id=PAD)
  with pytest.raises(ValueError, match="pad_id"):
    packing.pack_documents([[1, 0, 2]], length=16, pad_id=PAD)
  _, _, dropped = packing.pack_documents([[1] * 10, [2] * 10, [3] * 3], length=13, pad_id=PAD,
                                         rows=1)
  assert dropped == [1]


def test_both_row_policies_share_one_row_layout():
  """first_fit (verbs) and text.row_starts only choose the rows; fill_rows lays
  them out (segment ids 1, 2, ..., padding 0, either pad side) for both."""
  lengths = [3, 5, 2, 6, 4]
  assert text.row_starts(lengths, 8, pack=True).tolist() == [0, 2, 4, 5]
  assert text.row_starts(lengths, 8, pack=False).tolist() == [0, 1, 2, 3, 4, 5]
  # Longest first, each into the first row with room; stream order inside a row.
  assert packing.first_fit(lengths, 8) == ([[2, 3], [0, 1], [4]], [])
  pieces = [[np.array([5, 6, 7]), np.array([8, 9])], [np.array([4, 4])]]
  ids, seg, tlm = packing.fill_rows(pieces, length=6, pad_id=PAD)
  np.testing.assert_array_equal(ids, [[5, 6, 7, 8, 9, 0], [4, 4, 0, 0, 0, 0]])
  np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]])
  assert tlm is None
  masked = [[(p, np.ones(len(p), np.uint8)) for p in row] for row in pieces]
  ids, seg, tlm = packing.fill_rows(masked, length=6, pad_id=PAD, pad_side="left",
                                    with_mask=True)
  np.testing.assert_array_equal(ids, [[0, 5, 6, 7, 8, 9], [0, 0, 0, 0, 4, 4]])
  np.testing.assert_array_equal(seg, [[0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(tlm, seg > 0)
  # pack_documents is first_fit + fill_rows; rows it cannot fill are all padding.
  docs = [[1] * 3, [2] * 5, [3] * 2]
  ids, seg, _ = packing.pack_documents(docs, length=8, pad_id=PAD, rows=3)
  assignment, _ = packing.first_fit([len(d) for d in docs], 8, rows=3)
  want, _, _ = packing.fill_rows([[docs[i] for i in r] for r in assignment] + [[]],
                                 length=8, pad_id=PAD)
  np.testing.assert_array_equal(ids, want)
  assert (ids[-1] == PAD).all() and (seg[-1] == 0).all()


def test_packed_logits_and_losses_equal_unpacked():
  docs = _docs(np.random.default_rng(4), n=9, lo=3, hi=10)
  model = _jit_apply(_model())
  packed, _ = packing.pack_batch(docs, length=16, pad_id=PAD)
  assert packed.shape[0] < len(docs)  # really packed
  unpacked = batch_from_ids(pad_sequences(docs, pad_id=PAD, length=16), pad_id=PAD)

  def run(b, seg=True):
    logits = model(b.inputs, key_mask=b.key_mask, positions=b.positions,
                   segment_ids=b.segment_ids if seg else None)
    nll, _, _ = losses.per_token_nll(logits, b.targets, b.loss_mask)
    return np.asarray(logits), np.asarray(nll)

  lp, np_ = run(packed)
  lu, nu = run(unpacked)
  ids_full, seg_full, _ = packing.pack_documents(docs, length=16, pad_id=PAD)
  assignment, _ = packing.first_fit([len(d) for d in docs], 16)
  for r, row in enumerate(assignment):
    at = 0
    for i in row:
      n = len(docs[i]) - 1  # inputs of the document
      np.testing.assert_allclose(lp[r, at:at + n], lu[i, :n], atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(np_[r, at:at + n], nu[i, :n], atol=1e-5, rtol=1e-5)
      at += n + 1
  np.testing.assert_allclose(np_.sum(), nu.sum(), rtol=1e-5)
  # Planted bug: without the segment mask, later documents see earlier ones.
  lbug, _ = run(packed, seg=False)
  assert np.abs(lbug - lp).max() > 1e-3


# ---------------------------------------------------------------------------
# Structured attention form == boolean form; fused path == einsum path.

def _key_masks(rng, b=5, t=9, side="right"):
  lens = rng.integers(0, t + 1, size=b)
  lens[0] = 0
  km = np.zeros((b, t), bool)
  for i, n in enumerate(lens):
    if side == "right":
      km[i, :n] = True
    else:
      km[i, t - n:] = True
  return km


def structure_to_mask(structure, t: int) -> np.ndarray:
  """The dense bool (B, 1, T, T) mask an AttentionStructure stands for, in numpy."""
  mask = np.ones((1, 1, t, t), bool)
  if structure.is_causal:
    mask = mask & np.tril(np.ones((t, t), bool))
  if structure.key_value_seq_lengths is not None:
    lengths = np.asarray(structure.key_value_seq_lengths)
    mask = mask & (np.arange(t)[None, :] < lengths[:, None])[:, None, None, :]
  if structure.mask is not None:
    mask = mask & np.asarray(structure.mask)
  return mask


@pytest.mark.parametrize("causal", [True, False])
def test_attention_structure_equals_boolean_mask(causal):
  rng = np.random.default_rng(5)
  km = _key_masks(rng)
  dense = np.asarray(masks.attention_mask(km, causal=causal))
  for prefix in (True, False):
    st = masks.attention_structure(km, causal=causal, keys_are_prefix=prefix)
    np.testing.assert_array_equal(np.asarray(structure_to_mask(st, 9)), dense)
  seg = np.where(km, 1 + (np.arange(9)[None] >= 4), 0)
  dense_seg = np.asarray(masks.attention_mask(km, segment_ids=seg, causal=causal))
  st = masks.attention_structure(km, segment_ids=seg, causal=causal)
  np.testing.assert_array_equal(np.asarray(structure_to_mask(st, 9)), dense_seg)
  for s, d in ((None, dense), (seg, dense_seg)):
    np.testing.assert_array_equal(np.asarray(masks.rows_with_key(km, segment_ids=s, causal=causal)),
                                  d.any(-1, keepdims=True).astype(np.float32))
  # Planted bug: left-padded keys sent as lengths (the promise broken) is wrong.
  kl = _key_masks(rng, side="left")
  bad = masks.attention_structure(kl, causal=causal, keys_are_prefix=True)
  assert (np.asarray(structure_to_mask(bad, 9)) !=
          np.asarray(masks.attention_mask(kl, causal=causal))).any()


@pytest.mark.parametrize("case", ["right", "left", "packed"])
def test_fused_attention_equals_einsum(case):
  rng = np.random.default_rng(6)
  ref = _jit_apply(_model())
  seqs = _docs(rng, n=4, lo=2, hi=12)
  if case == "packed":
    b, _ = packing.pack_batch(seqs + _docs(rng, n=4), length=14, pad_id=PAD, rows=4)
  else:
    b = batch_from_ids(pad_sequences(seqs + [[3]], pad_id=PAD, length=14, pad_side=case),
                       pad_id=PAD)  # the last row has no real key for most queries
  prefix = case == "right"
  kw = dict(key_mask=b.key_mask, positions=b.positions,
            segment_ids=b.segment_ids if case == "packed" else None)
  want = np.asarray(ref(b.inputs, **kw))
  got = np.asarray(_jit_apply(_model(attention="xla"), keys_are_prefix=prefix)(b.inputs, **kw))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.isfinite(got).all()


def test_fused_attention_zero_rows_without_keys():
  attn_ref = _model().blocks[0].attn
  attn_fused = _model(attention="xla").blocks[0].attn
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
  km = np.array([[False, False, True, True, True], [True] * 5])  # left padding
  allowed = masks.attention_mask(km)
  has = masks.rows_with_key(km)
  out_ref, _ = attn_ref(x, masks.to_bias(allowed), allowed.any(-1, keepdims=True).astype(jnp.float32))
  out_f, _ = attn_fused(x, masks.attention_structure(km), has)
  np.testing.assert_allclose(out_f, out_ref, atol=1e-5)
  # the two queries with no key give the output projection's bias only (zero attention)
  np.testing.assert_allclose(out_f[0, :2], np.broadcast_to(attn_fused.out.bias[...], (2, 32)),
                             atol=1e-6)


def _assert_variants_equal(seed, variants, **model_kwargs):
  """Loss and gradients of each model variant equal those of the first one."""
  b = batch_from_ids(_skewed_ids(np.random.default_rng(seed)), pad_id=PAD)
  outs = []
  for kw in variants:
    gd, params = nnx.split(_model(**model_kwargs, **kw), nnx.Param)
    f = jax.jit(lambda p: losses.loss_and_grads(_logits_fn(gd), p, b,
                                                    reduction="token_mean")[:2])
    outs.append(f(params))
  for loss, g in outs[1:]:
    np.testing.assert_allclose(loss, outs[0][0], rtol=1e-5)
    for a, c in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(g)):
      np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)


def test_remat_and_scan_equal_plain_in_value_and_gradient():
  _assert_variants_equal(7, ({}, {"remat": True}, {"scan_layers": True}))


def test_decoder_config_rejects_unknown_attention():
  with pytest.raises(ValueError, match="attention must be one of"):
    DecoderConfig(vocab_size=5, dropout=0.0, attention="flash")


# ---------------------------------------------------------------------------
# Mesh arithmetic and sharding rules (no devices needed).

def test_mesh_shape_resolution_and_errors():
  assert parallel.mesh_shape(-1, 1, 8) == (8, 1)
  assert parallel.mesh_shape(4, -1, 8) == (4, 2)
  assert parallel.mesh_shape(-1, 2, 8) == (4, 2)
  with pytest.raises(ValueError, match="devices are visible"):
    parallel.mesh_shape(3, 2, 8)
  with pytest.raises(ValueError, match="only one"):
    parallel.mesh_shape(-1, -1, 8)
  with pytest.raises(ValueError, match="groups of 3"):
    parallel.mesh_shape(-1, 3, 8)
  with pytest.raises(ValueError, match="positive int or -1"):
    parallel.mesh_shape(0, 1, 8)


def test_sharding_rules_and_batch_checks():
  mesh = parallel.make_mesh(1, 1)
  path = (jax.tree_util.DictKey("blocks"), jax.tree_util.DictKey(0),
          jax.tree_util.DictKey("fc1"), jax.tree_util.DictKey("kernel"))
  assert parallel.logical_axes(path, (32, 64)) == ("embed", "mlp")
  assert parallel.logical_axes(path[:-1] + (jax.tree_util.DictKey("scale"),), (32,)) is None
  parallel.check_batch_size(8, mesh, 4)
  with pytest.raises(ValueError, match="divisible"):
    parallel.check_batch_size(6, mesh, 4)
  assert parallel.process_rows(parallel.batch_sharding(mesh), 8) == (0, 8)


def test_distributed_config_errors():
  from ml_collections import ConfigDict
  assert parallel.initialize_distributed(ConfigDict({"mode": "off"})) is False
  with pytest.raises(ValueError, match="off | auto | manual"):
    parallel.initialize_distributed(ConfigDict({"mode": "slurm"}))
  c = config_lib.defaults().distributed
  c.mode, c.num_processes, c.process_id = "manual", 2, 0
  with pytest.raises(ValueError, match="coordinator_address"):
    parallel.initialize_distributed(c)


def test_gelu_exact_matches_erf_formula_and_its_gradient():
  import math

  from lmmask.model import gelu_exact
  x = np.linspace(-8, 8, 801).astype(np.float32)
  ref = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
  dref = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
                   for v in x.astype(np.float64)])
  np.testing.assert_allclose(gelu_exact(x), ref, atol=2e-6)
  np.testing.assert_allclose(jax.grad(lambda a: gelu_exact(a).sum())(x), dref, atol=2e-6)
  # Planted bug: the tanh approximation is a different function.
  assert np.abs(np.asarray(jax.nn.gelu(x, approximate=True)) - ref).max() > 1e-4


# ---------------------------------------------------------------------------
# The speed paths with the decoder options, z-loss inside the accumulated
# objective, packing per corpus.

_OPTIONS = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2,
                tie_embeddings=True)


@pytest.mark.parametrize("case", ["right", "packed"])
def test_fused_attention_equals_einsum_with_decoder_options(case):
  """rope + GQA (2 kv heads for 4 query heads) + swiglu + rmsnorm + tied head."""
  rng = np.random.default_rng(16)
  seqs = _docs(rng, n=4, lo=2, hi=12)
  if case == "packed":
    b, _ = packing.pack_batch(seqs + _docs(rng, n=4), length=14, pad_id=PAD, rows=4)
  else:
    b = batch_from_ids(pad_sequences(seqs, pad_id=PAD, length=14), pad_id=PAD)
  kw = dict(key_mask=b.key_mask, positions=b.positions,
            segment_ids=b.segment_ids if case == "packed" else None)
  want = np.asarray(_jit_apply(_model(**_OPTIONS))(b.inputs, **kw))
  got = np.asarray(_jit_apply(_model(attention="xla", **_OPTIONS),
                              keys_are_prefix=case == "right")(b.inputs, **kw))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Planted bug: packed rows run without their segment ids attend across documents.
  if case == "packed":
    leak = np.asarray(_jit_apply(_model(attention="xla", **_OPTIONS))(
        b.inputs, key_mask=b.key_mask, positions=b.positions, segment_ids=None))
    assert np.abs(leak - want).max() > 1e-3


def test_remat_and_scan_equal_plain_with_rope():
  _assert_variants_equal(17, ({}, {"remat": True}, {"scan_layers": True, "remat": True}),
                         **_OPTIONS)


def test_z_loss_inside_accumulated_objective():
  """objective = CE + losses.z_loss (its gradient too), for any micro-batch split;
  metrics["loss"] stays the cross-entropy and metrics["z_loss"] is the z term."""
  coef = 0.3
  batch = batch_from_ids(_skewed_ids(np.random.default_rng(18)), pad_id=PAD)
  gd, params = nnx.split(_model(), nnx.Param)
  reduction = "seq_mean_of_means"

  def reference(p):
    logits = _logits_fn(gd)(p, batch, None)
    ce, _ = losses.masked_cross_entropy(logits, batch.targets, batch.loss_mask,
                                        reduction=reduction)
    z = losses.z_loss(logits, batch.loss_mask, coefficient=coef, reduction=reduction)
    return ce + z, (ce, z)

  (ref_total, (ref_ce, ref_z)), ref_g = jax.jit(jax.value_and_grad(reference, has_aux=True))(
      params)
  run = jax.jit(lambda p, s, c: losses.loss_and_grads(
      _logits_fn(gd), p, batch, reduction=reduction, steps=s, z_loss=c), static_argnums=(1, 2))
  for steps in (1, 4):
    total, g, m = run(params, steps, coef)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], ref_ce, rtol=1e-5)
    np.testing.assert_allclose(m["z_loss"], ref_z, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g)):
      np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)
  # Planted bug: without the z term the gradient is a different one.
  _, g0, m0 = run(params, 1, 0.0)
  assert "z_loss" not in m0
  assert max(float(np.abs(np.asarray(a) - np.asarray(c)).max())
             for a, c in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g0))) > 1e-4


def test_packing_flag_per_corpus():
  # keys_are_prefix is each corpus's own promise: tests/test_registry.py checks it.
  from conftest import tiny_config

  c = tiny_config()
  c.data.packing = True
  config_lib.validate(c)  # verbs packing is fine
  c.data.corpus = "text"
  config_lib.validate(c)  # and so is text's: one knob for both row policies
  c.data.corpus = "shards"
  with pytest.raises(ValueError, match="data.packing"):
    config_lib.validate(c)  # one whole document per row


def _chunked_fn(graphdef, chunk):
  """The LM head applied inside the loss, `chunk` positions at a time (loss.logits_chunk)."""
  def f(p, mb, rng):
    model = nnx.merge(graphdef, p)
    hidden = model(mb.inputs, key_mask=mb.key_mask, positions=mb.positions,
                   segment_ids=mb.segment_ids, apply_head=False)
    return losses.ChunkedLogits(hidden, model.logits, chunk)
  return f


def test_chunked_logits_give_the_one_pass_loss_gradients_and_metrics():
  """Chunks of 5 over 11 positions (the last one padded), a row with no target, z-loss on
  (micro-batches feed `_micro` the same way, so one step covers them)."""
  reduction, steps = "token_mean", 1
  batch = batch_from_ids(_skewed_ids(np.random.default_rng(2)), pad_id=PAD)
  gd, params = nnx.split(_model(), nnx.Param)
  run = jax.jit(lambda p, b, fn: losses.loss_and_grads(fn, p, b, reduction=reduction,
                                                       steps=steps, z_loss=1e-3),
                static_argnums=2)
  loss1, g1, m1 = run(params, batch, _logits_fn(gd))
  loss5, g5, m5 = run(params, batch, _chunked_fn(gd, 5))
  np.testing.assert_allclose(loss5, loss1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g5)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  assert sorted(m5) == sorted(m1)
  for k in m1:
    np.testing.assert_allclose(m5[k], m1[k], rtol=1e-6, err_msg=k)
  # Planted bug: a mean of per-chunk token means is not the token mean; the
  # tolerance above would catch it.
  logits = _logits_fn(gd)(params, batch, None)
  per_chunk = [losses.masked_cross_entropy(logits[:, c:c + 5], batch.targets[:, c:c + 5],
                                           batch.loss_mask[:, c:c + 5])[0] for c in (0, 5, 10)]
  assert abs(float(np.mean(per_chunk)) - float(m1["loss"])) > 1e-3 * float(m1["loss"])
