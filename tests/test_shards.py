"""Token/mask shards: format round trip, validation, mask alignment, whole-document rows."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmmask.batching import batch_from_ids
from lmmask.data import pipeline, shards
from lmmask.model import Decoder, DecoderConfig

PAD = 0


def _docs(n=40, seed=0, lo=3, hi=20, vocab=50):
  rng = np.random.default_rng(seed)
  docs, masks = [], []
  for _ in range(n):
    k = int(rng.integers(lo, hi))
    docs.append(rng.integers(1, vocab, size=k).tolist())
    m = (rng.random(k) < 0.4).astype(np.uint8)
    m[0] = 0
    masks.append(m.tolist())
  return docs, masks


def _write(tmp_path, name="ds", n=40, shard_tokens=100, masks=True, **kw):
  docs, m = _docs(n)
  path = str(tmp_path / name)
  shards.write_dataset(path, {"train": (docs, m if masks else None), "val": (docs[:8], m[:8])},
                       vocab_size=50, pad_id=PAD, kind="chat", shard_tokens=shard_tokens, **kw)
  return path, docs, m


def test_roundtrip_and_file_names(tmp_path):
  path, docs, masks = _write(tmp_path)
  meta = shards.read_meta(path)
  info = meta["splits"]["train"]
  assert meta["format_version"] == shards.FORMAT_VERSION and meta["vocab_size"] == 50
  assert len(info["shards"]) > 1  # shard_tokens=100 forces several shards
  for i, s in enumerate(info["shards"]):
    assert s["tokens"] == f"shard_{i:03d}.bin" and s["mask"] == f"shard_{i:03d}_mask.bin"
    tfile = os.path.join(path, "train", s["tokens"])
    assert os.path.getsize(tfile) == 4 * s["num_tokens"]  # uint32
    assert os.path.getsize(os.path.join(path, "train", s["mask"])) == s["num_tokens"]  # uint8
    assert np.fromfile(tfile, dtype="<u4").size == s["num_tokens"]
  assert info["num_tokens"] == sum(len(d) for d in docs)
  assert info["num_mask_tokens"] == sum(sum(m) for m in masks)
  split = shards.ShardSplit(path, "train", use_loss_mask=True)
  assert len(split) == len(docs)
  for i, (d, m) in enumerate(zip(docs, masks)):
    t, mm = split.doc(i)
    assert t.tolist() == d and mm.tolist() == m
  # no document straddles two shards
  sizes = [s["num_tokens"] for s in info["shards"]]
  assert all(start + n <= sizes[s] for s, start, n in split.index)
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_plain_text_masks_are_all_ones(tmp_path):
  path, docs, _ = _write(tmp_path, masks=False)
  split = shards.ShardSplit(path, "train", use_loss_mask=False)
  assert split.density == 1.0
  assert all(split.doc(i)[1].tolist() == [1] * len(d) for i, d in enumerate(docs))


def test_write_refuses_existing_and_never_half_writes(tmp_path):
  path, _, _ = _write(tmp_path)
  with pytest.raises(FileExistsError, match="already exists"):
    _write(tmp_path)
  docs, masks = _docs(10)
  masks[5][1] = 2
  bad = str(tmp_path / "bad")
  with pytest.raises(ValueError, match="document 5: mask values must be 0 or 1"):
    shards.write_dataset(bad, {"train": (docs, masks)}, vocab_size=50, pad_id=PAD, kind="chat")
  assert not os.path.exists(bad)
  assert sorted(os.listdir(tmp_path)) == ["ds"]


# --- validation ------------------------------------------------------------

def test_length_mismatch_names_shard_and_both_lengths(tmp_path):
  path, _, _ = _write(tmp_path)
  mfile = os.path.join(path, "train", "shard_001_mask.bin")
  n = os.path.getsize(mfile)
  with open(mfile, "r+b") as f:
    f.truncate(n - 3)
  for use in (True, False):  # damaged masks are refused even when unused
    with pytest.raises(ValueError) as e:
      shards.ShardSplit(path, "train", use_loss_mask=use)
    msg = str(e.value)
    assert "shard_001_mask.bin" in msg and f"{n - 3} entries" in msg and f"{n} tokens" in msg


def test_mask_values_other_than_0_1(tmp_path):
  path, _, _ = _write(tmp_path)
  mfile = os.path.join(path, "train", "shard_000_mask.bin")
  m = np.fromfile(mfile, dtype=np.uint8)
  m[7] = 3
  m.tofile(mfile)
  with pytest.raises(ValueError, match=r"shard_000_mask.bin holds values \[3\] \(first at "
                                       r"position 7\).*0 \(context\) or 1"):
    shards.ShardSplit(path, "train", use_loss_mask=True)


def test_missing_mask_shards_listed(tmp_path):
  path, docs, _ = _write(tmp_path)
  gone = [os.path.join(path, "train", f) for f in ("shard_000_mask.bin", "shard_002_mask.bin")]
  for g in gone:
    os.remove(g)
  with pytest.raises(ValueError) as e:
    shards.ShardSplit(path, "train", use_loss_mask=True)
  msg = str(e.value)
  assert "use_loss_mask=True" in msg and "2 of" in msg and all(g in msg for g in gone)
  assert "use_loss_mask=False" in msg  # says how to fix
  # without the mask every real target counts
  split = shards.ShardSplit(path, "train", use_loss_mask=False)
  loader = shards.ShardLoader(split, length=24, batch_size=4, seed=0, use_loss_mask=False,
                              pad_id=PAD)
  b = loader.rows([0])
  assert b.loss_mask.sum() == len(docs[0]) - 1


def test_density_warning(tmp_path, recwarn):
  path, _, _ = _write(tmp_path, masks=False)
  with pytest.warns(UserWarning, match=r"loss-mask density is 1\.000, outside 0\.1-0\.9"):
    shards.ShardSplit(path, "train", use_loss_mask=True)
  ok, _, _ = _write(tmp_path, name="ok")  # density ~0.38
  recwarn.clear()
  shards.ShardSplit(ok, "train", use_loss_mask=True)
  shards.ShardSplit(path, "train", use_loss_mask=False)  # unused masks: no warning
  assert not [w for w in recwarn if "density" in str(w.message)]


def test_too_long_documents_refused(tmp_path):
  path, docs, _ = _write(tmp_path)
  split = shards.ShardSplit(path, "train", use_loss_mask=True)
  with pytest.raises(ValueError, match=r"more than data.length=10 tokens \(longest "
                                       f"{max(map(len, docs))}\\); rows are whole documents"):
    shards.ShardLoader(split, length=10, batch_size=4, seed=0, use_loss_mask=True, pad_id=PAD)


# --- mask alignment after the shift -----------------------------------------

def _reference_loss_mask(docs, masks, rows, length):
  """Plain loops: target t of a row is token t+1 of its document; it counts when
  both token t and t+1 exist and token t+1's mask is 1."""
  out = np.zeros((len(rows), length - 1), np.float32)
  for r, i in enumerate(rows):
    for t in range(length - 1):
      if t + 1 < len(docs[i]) and masks[i][t + 1] == 1:
        out[r, t] = 1.0
  return out


def _unshifted_twin(loader, rows):
  """Planted bug: the token mask applied to the INPUT positions (not shifted)."""
  ids = np.full((len(rows), loader.length), PAD)
  tlm = np.zeros_like(ids)
  for r, i in enumerate(rows):
    t, m = loader.split.doc(i)
    ids[r, :t.size], tlm[r, :t.size] = t, m
  b = batch_from_ids(ids, pad_id=PAD)
  return b.loss_mask * tlm[:, :-1]


def test_mask_alignment_after_shift(tmp_path):
  path, docs, masks = _write(tmp_path)
  split = shards.ShardSplit(path, "train", use_loss_mask=True)
  loader = shards.ShardLoader(split, length=24, batch_size=8, seed=3, use_loss_mask=True,
                              pad_id=PAD)
  for step in range(6):
    rows = loader.doc_ids(step)
    b = loader.batch(step)
    np.testing.assert_array_equal(b.loss_mask, _reference_loss_mask(docs, masks, rows, 24))
    for r, i in enumerate(rows):  # targets are the next tokens of the same document
      n = len(docs[i])
      assert b.inputs[r, :n - 1].tolist() == docs[i][:-1]
      assert b.targets[r, :n - 1].tolist() == docs[i][1:]
    # the planted twin must be caught by the same reference
    assert not np.array_equal(_unshifted_twin(loader, rows),
                              _reference_loss_mask(docs, masks, rows, 24))


# --- whole documents, no attention across conversations ----------------------

def _naive_window_twin(split, length, batch_size, step):
  """Planted bug: fixed windows over the concatenated token stream."""
  stream = np.concatenate([np.asarray(t) for t in split.tokens])
  start = step * batch_size * length
  return stream[start:start + batch_size * length].reshape(batch_size, length)


def _rows_are_whole_documents(ids, split):
  docs = [split.doc(i)[0].tolist() for i in range(len(split))]
  for row in ids:
    real = [int(t) for t in row if t != PAD]
    if real not in docs or row[:len(real)].tolist() != real:
      return False
  return True


def test_rows_are_whole_documents(tmp_path):
  path, _, _ = _write(tmp_path)
  split = shards.ShardSplit(path, "train", use_loss_mask=True)
  loader = shards.ShardLoader(split, length=24, batch_size=8, seed=0, use_loss_mask=True,
                              pad_id=PAD)
  for step in range(5):
    b = loader.batch(step)
    ids = np.concatenate([b.inputs, b.targets[:, -1:]], axis=1)
    assert _rows_are_whole_documents(ids, split)
  assert not _rows_are_whole_documents(_naive_window_twin(split, 24, 8, 1), split)


def test_no_token_attends_across_conversations(tmp_path):
  path, _, _ = _write(tmp_path)
  split = shards.ShardSplit(path, "train", use_loss_mask=True)
  loader = shards.ShardLoader(split, length=24, batch_size=4, seed=0, use_loss_mask=True,
                              pad_id=PAD)
  b = loader.batch(0)
  model = Decoder(DecoderConfig(vocab_size=50, dropout=0.0, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                max_len=24, attention="einsum"), rngs=nnx.Rngs(params=0))

  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def fwd(inputs):
    return nnx.merge(graphdef, params)(
        inputs, key_mask=jnp.asarray(b.key_mask), positions=jnp.asarray(b.positions),
        segment_ids=jnp.asarray(b.segment_ids), return_attention=True)

  def run(inputs):
    return fwd(jnp.asarray(inputs))
  logits, probs = run(b.inputs)
  p = np.asarray(probs[0])  # (B, H, T, T)
  km = np.asarray(b.key_mask)
  # attention lands only on real keys of the query's own row (= its own conversation)
  assert np.all(p[~np.broadcast_to(km[:, None, None, :], p.shape)] == 0)
  # changing every other row and all padding leaves row 0's real positions unchanged
  other = np.array(b.inputs)
  rng = np.random.default_rng(1)
  other[1:] = rng.integers(1, 50, size=other[1:].shape)
  other[0, ~km[0]] = rng.integers(1, 50, size=(~km[0]).sum())
  logits2, _ = run(other)
  n = km[0].sum()
  np.testing.assert_allclose(np.asarray(logits2)[0, :n], np.asarray(logits)[0, :n],
                             rtol=1e-5, atol=1e-5)


# --- resumable position ------------------------------------------------------

def test_loader_position_is_step_derived(tmp_path):
  path, _, _ = _write(tmp_path)
  split = shards.ShardSplit(path, "train", use_loss_mask=True)
  kw = dict(length=24, batch_size=6, seed=5, use_loss_mask=True, pad_id=PAD)
  first = shards.ShardLoader(split, **kw)
  uninterrupted = [first.batch(k) for k in range(12)]
  resumed = shards.ShardLoader(shards.ShardSplit(path, "train", use_loss_mask=True), **kw)
  for k in range(7, 12):  # a run restored at step 7 continues with batch 7
    b = resumed.batch(k)
    np.testing.assert_array_equal(b.inputs, uninterrupted[k].inputs)
    np.testing.assert_array_equal(b.loss_mask, uninterrupted[k].loss_mask)
  assert not np.array_equal(resumed.batch(7).inputs, uninterrupted[0].inputs)
  # one epoch (40 docs, 6 per step) visits every document once before repeating
  seen = np.concatenate([first.doc_ids(k) for k in range(7)])[:40]
  assert sorted(seen.tolist()) == list(range(40))
  # step 7 reads epoch 1 from offset 2 (42 slots into 40 documents): its first two
  # rows are the second epoch's first shuffle slots
  np.testing.assert_array_equal(first.doc_ids(7)[:2],
                                pipeline.epoch_permutation(40, 5, 1)[2:4])
