"""The Pallas attention kernels (splash for TPU, Triton mha for GPU) on CPU, in
interpret mode, against the einsum reference: the segment-id form of the mask,
forward and gradients, a whole decoder with rope and grouped heads, the leak test
for every attention path, and a short packed training run."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config
from flax import nnx

from lmmask import config as config_lib
from lmmask import masks
from lmmask import model as M
from lmmask import step as step_lib
from lmmask.batching import batch_from_segments
from lmmask.eval import audit

KERNELS = M.KERNELS
# Every path that runs on this CPU (cudnn needs a GPU: benchmarks/gpu_check.py checks it).
CPU_IMPLS = tuple(n for n in M.ATTENTION_IMPLS if "cpu" in M.ATTENTION_PLATFORMS.get(n, ("cpu",)))
T = 150  # not a multiple of the kernel block: padded to 256


def _rows(t=T):
  """Segment ids (B, t), 0 = pad: left padding, right padding, three packed documents
  plus a pad tail, a row that is all padding."""
  seg = np.zeros((4, t), np.int32)
  seg[0, 37:] = 1
  seg[1, :101] = 1
  seg[2, :40], seg[2, 40:95], seg[2, 95:131] = 1, 2, 3
  return seg


# ---------------------------------------------------------------------------
# The mask: segment ids + causal == attention_mask at every real query.

def _dense_reference(key_mask, seg, causal):
  """Plain numpy: query i may see key j iff j is real, in i's segment, j <= i if causal."""
  b, t = key_mask.shape
  out = np.zeros((b, t, t), bool)
  for r in range(b):
    for i in range(t):
      for j in range(t):
        out[r, i, j] = (key_mask[r, j] and seg[r, j] != 0 and seg[r, i] == seg[r, j]
                        and (j <= i or not causal))
  return out


def _pads_share_real_ids(key_mask, *, segment_ids=None, causal=True, block):
  """Planted bug: pads keep the id of the row's documents (a kernel fed raw ids)."""
  km = masks.kernel_mask(key_mask, segment_ids=segment_ids, causal=causal, block=block)
  seg = jnp.ones(key_mask.shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
  ids = jnp.pad(jnp.maximum(seg, 1), ((0, 0), (0, km.segment_ids.shape[1] - seg.shape[1])))
  return km._replace(segment_ids=ids)


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_mask_equals_attention_mask_at_real_queries(causal):
  seg = _rows(20)
  seg[2, :8], seg[2, 8:13], seg[2, 13:17] = 1, 2, 3
  seg[0, :7], seg[0, 7:] = 0, 1  # left padding
  km_ = seg > 0
  for build, should_match in ((masks.kernel_mask, True), (_pads_share_real_ids, False)):
    for ids in (seg, None):  # packed ids, or none (one document per row)
      key_mask = km_ if ids is not None else (seg > 0)
      want = _dense_reference(key_mask, ids if ids is not None else key_mask.astype(int), causal)
      km = build(jnp.asarray(key_mask), segment_ids=None if ids is None else jnp.asarray(ids),
                 causal=causal, block=16)
      assert km.segment_ids.shape == (4, 32)
      dense = np.asarray(masks.kernel_mask_to_mask(km))[:, 0]
      real = np.asarray(km.real)
      got = dense[:, :20, :20]
      same = all((got[r, i] == want[r, i]).all() for r in range(4) for i in range(20) if real[r, i])
      assert same == should_match
      if should_match:
        assert (real == (key_mask & ((ids if ids is not None else 1) != 0))).all()
        assert dense.any(axis=-1).all()  # no empty row, pads and block padding included
        # the library's own dense mask agrees too
        ref = np.asarray(masks.attention_mask(key_mask, segment_ids=ids, causal=causal))[:, 0]
        assert all((got[r, i] == ref[r, i]).all() for r in range(4) for i in range(20) if real[r, i])


def test_kernel_mask_refuses_bad_block():
  with pytest.raises(ValueError, match="block"):
    masks.kernel_mask(jnp.ones((1, 4), bool), block=0)


# ---------------------------------------------------------------------------
# One attention layer: forward and d/d(q, k, v) against `attend`.

def _qkv(hkv=2, h=4, d=32, t=T, seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(4, t, h, d)), jnp.float32)
  k = jnp.asarray(r.normal(size=(4, t, hkv, d)), jnp.float32)
  v = jnp.asarray(r.normal(size=(4, t, hkv, d)), jnp.float32)
  w = jnp.asarray(r.normal(size=(4, t, h * d)), jnp.float32)  # a fixed loss direction
  return q, k, v, w


def _reference(q, k, v, key_mask, seg):
  allowed = masks.attention_mask(key_mask, segment_ids=seg)
  has = allowed.any(axis=-1, keepdims=True).astype(jnp.float32)
  return M.attend(q, k, v, masks.to_bias(allowed), has)[0]


def _kernel(impl):
  def f(q, k, v, key_mask, seg):
    km = masks.kernel_mask(key_mask, segment_ids=seg, block=M.KERNEL_BLOCK)
    return M.attend_kernel(q, k, v, km, impl)
  return f


def _value_and_grads(attn, q, k, v, w, key_mask, seg):
  real = key_mask[:, :, None].astype(jnp.float32)  # the loss sees real positions only

  def loss(q, k, v):
    out = attn(q, k, v, key_mask, seg)
    return (out * w * real).sum(), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_forward_and_grads_equal_einsum(impl):
  q, k, v, w = _qkv()
  seg = jnp.asarray(_rows())
  key_mask = seg > 0
  ref_out, ref_g = jax.jit(lambda *a: _value_and_grads(_reference, *a))(q, k, v, w, key_mask, seg)
  out, g = jax.jit(lambda *a: _value_and_grads(_kernel(impl), *a))(q, k, v, w, key_mask, seg)
  out, ref_out = np.asarray(out), np.asarray(ref_out)
  real = np.asarray(key_mask)
  assert np.isfinite(out).all()
  err = np.abs(out - ref_out)[real].max()
  assert err < 1e-5, err
  assert (out[~real] == 0).all()  # pad rows (the all-pad row too): zero, as the reference
  for name, a, b in zip("qkv", g, ref_g):
    a, b = np.asarray(a), np.asarray(b)
    assert np.isfinite(a).all()
    gerr = np.abs(a - b).max() / np.abs(b).max()
    assert gerr < 1e-4, (name, gerr)
  # The twin: the same kernel fed ids where pads share the documents' id sees the pads.
  def leaky(q, k, v, key_mask, seg):
    return M.attend_kernel(q, k, v, _pads_share_real_ids(key_mask, segment_ids=seg,
                                                         block=M.KERNEL_BLOCK), impl)
  bad = np.asarray(jax.jit(leaky)(q, k, v, key_mask, seg))
  assert np.abs(bad - ref_out)[real].max() > 1e-2


def test_kernel_refuses_unpadded_sequence():
  q, k, v, _ = _qkv(t=8)
  km = masks.kernel_mask(jnp.ones((4, 8), bool), block=8)
  with pytest.raises(ValueError, match="model.attention='splash'.*einsum"):
    M.attend_kernel(q, k, v, km, "splash")


# ---------------------------------------------------------------------------
# The decoder: rope + grouped heads, equal to einsum; the leak test for every path.

def _decoder(impl):
  cfg = M.DecoderConfig(vocab_size=29, dropout=0.0, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=48, max_len=T, pos_encoding="rope", attention=impl)
  return M.Decoder(cfg, rngs=nnx.Rngs(params=0))


def _packed_inputs():
  seg = _rows()
  pos = np.zeros_like(seg)
  for r in range(seg.shape[0]):
    for s in set(seg[r].tolist()) - {0}:
      idx = np.nonzero(seg[r] == s)[0]
      pos[r, idx] = np.arange(len(idx))
  ids = np.random.default_rng(1).integers(1, 29, seg.shape)
  return jnp.asarray(np.where(seg > 0, ids, 0)), jnp.asarray(seg), jnp.asarray(pos)


@pytest.fixture(scope="module")
def einsum_logits():
  x, seg, pos = _packed_inputs()
  return np.asarray(_decoder("einsum")(x, key_mask=seg > 0, positions=pos, segment_ids=seg))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_no_leak_across_documents_or_from_the_future(impl, einsum_logits):
  model = _decoder(impl)
  fwd = jax.jit(lambda x, seg, pos: model(x, key_mask=seg > 0, positions=pos, segment_ids=seg))
  x, seg, pos = _packed_inputs()
  base = np.asarray(fwd(x, seg, pos))
  real = np.asarray(seg) > 0
  np.testing.assert_allclose(base[real], einsum_logits[real], atol=2e-5)
  # A token of document 1 (row 2) changes: no output of documents 2 and 3 moves.
  doc1 = np.asarray(fwd(x.at[2, 10].set(x[2, 10] % 28 + 1), seg, pos))
  assert np.abs(doc1[2, 40:131] - base[2, 40:131]).max() == 0
  assert np.abs(doc1[2, 10:40] - base[2, 10:40]).max() > 1e-4  # the change is seen
  # A future token changes: no earlier output moves (left-padded row 0 and row 2).
  fut = np.asarray(fwd(x.at[0, 120].set(x[0, 120] % 28 + 1).at[2, 60].set(x[2, 60] % 28 + 1),
                       seg, pos))
  assert np.abs(fut[0, :120] - base[0, :120]).max() == 0
  assert np.abs(fut[2, :60] - base[2, :60]).max() == 0
  assert np.abs(fut[0, 120:] - base[0, 120:]).max() > 1e-4


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_refuse_probabilities_and_head_masks(impl):
  model = _decoder(impl)
  x = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match=f"model.attention='{impl}'.*einsum"):
    model(x, return_attention=True)
  with pytest.raises(ValueError, match=f"head_mask.*model.attention='{impl}'.*einsum"):
    model(x, head_mask=jnp.ones(4))


# ---------------------------------------------------------------------------
# A whole packed training run: same losses as einsum over 20 steps.

def _packed_batches(n, rows=4, length=41, vocab=40, seed=0):
  r = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    seg = np.zeros((rows, length), np.int32)
    for i in range(rows):
      cuts = np.sort(r.choice(np.arange(3, 34), 2, replace=False))
      seg[i, :cuts[0]], seg[i, cuts[0]:cuts[1]], seg[i, cuts[1]:34 + i] = 1, 2, 3
    ids = np.where(seg > 0, r.integers(1, vocab, seg.shape), 0)
    out.append(batch_from_segments(ids, seg))
  return out


def _losses(impl, batches):
  config = tiny_config(**{"model.attention": impl, "model.dropout": 0.0, "data.packing": True,
                          "model.pos_encoding": "rope", "model.n_kv_heads": 2,
                          "model.max_len": 40, "model.scan_layers": True})  # one kernel body
  state = step_lib.create_train_state(config, jax.random.PRNGKey(0), vocab_size=40,
                                      keys_are_prefix=False)
  step = jax.jit(step_lib.train_step)
  losses = []
  for b in batches:
    state, m = step(state, b)
    losses.append(float(m["loss"]))
  return np.array(losses)


def test_packed_training_run_matches_einsum():
  batches = _packed_batches(20)
  ref = _losses("einsum", batches)
  assert ref[-1] < ref[0]  # it trains
  for impl in KERNELS:
    got = _losses(impl, batches)
    assert np.abs(got - ref).max() < 1e-4, (impl, np.abs(got - ref).max())


# ---------------------------------------------------------------------------
# Under the data x fsdp mesh: the kernels run per shard, the exact token-mean loss holds.

@pytest.mark.slow
def test_kernels_under_the_mesh_keep_the_exact_loss():
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.join(here, "kernel_mesh_worker.py")], env=env,
                        capture_output=True, text=True, timeout=600, cwd=REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stderr[-4000:]}"
  res = json.loads(lines[-1][len("RESULT "):])
  assert res["devices"] == 8
  for impl in KERNELS:
    r = res[impl]
    assert r["shard_maps"] >= 2, r  # forward and backward of the kernel, per shard
    assert r["tokens"][0] == r["tokens"][1]
    assert r["loss_rel"] < 1e-6 and r["grad_norm_rel"] < 1e-5 and r["params_max_diff"] < 1e-6, r


# ---------------------------------------------------------------------------
# model.attention: auto resolved once, a path a platform cannot run refused by name.

def test_auto_resolves_by_platform_and_packing():
  r = M.resolve_attention
  assert r("auto", "cpu", packed=True) == r("auto", "cpu", packed=False) == "einsum"
  assert r("auto", "tpu", packed=True) == r("auto", "tpu", packed=False) == "splash"
  assert r("auto", "gpu", packed=True) == "triton" and r("auto", "gpu", packed=False) == "cudnn"
  for name in M.ATTENTION_IMPLS:
    if name != "cudnn":
      assert r(name, "cpu", packed=True) == name  # named paths run as named (interpret mode)
  with pytest.raises(ValueError, match="model.attention: 'splash' does not run on gpu; use auto "
                                       "or one of einsum, xla, cudnn, triton"):
    r("splash", "gpu", packed=True)
  with pytest.raises(ValueError, match="'triton' does not run on tpu.*splash"):
    r("triton", "tpu", packed=False)
  c = tiny_config()
  assert c.model.attention == "auto"
  assert config_lib.decoder_config(c, 40).attention == "einsum"  # this CPU: the reference
  assert config_lib.decoder_config(c, 40, platform="tpu").attention == "splash"
  with pytest.raises(ValueError, match="needs attention"):
    M.DecoderConfig.from_dict({"vocab_size": 5})
  with pytest.raises(ValueError, match="model.attention.*unknown 'flash'"):
    config_lib.validate(config_lib.apply_overrides(c, {"model.attention": "flash"}))


def test_audit_attention_maps_come_from_einsum_on_the_same_weights():
  batch = _packed_batches(1)[0]
  states = {impl: step_lib.create_train_state(
      tiny_config(**{"model.attention": impl, "data.packing": True, "model.max_len": 40}),
      jax.random.PRNGKey(0), vocab_size=40, keys_are_prefix=False) for impl in ("einsum", "splash")}
  assert audit.attention_path(states["splash"]) == "splash"
  assert audit.attention_stats(states["splash"], [batch]) == \
      audit.attention_stats(states["einsum"], [batch])
  res = {"causal": True, "num_batches": 1, "tolerance": 1e-5, "attention": "splash",
         "checks": {}, "passed": True, "mass_above_diagonal": [], "mass_on_pad_keys": []}
  assert "model.attention=splash; it forms no attention probabilities" in audit.format_audit(res)


def test_resolved_attention_goes_to_provenance_not_results(tiny_run):
  workdir, results = tiny_run
  with open(os.path.join(workdir, "provenance.json")) as f:
    assert json.load(f)["attention"] == "einsum"  # auto on this CPU
  assert "attention" not in results
