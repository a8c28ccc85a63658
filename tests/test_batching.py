"""lmmask.batching against plain-loop references."""
import numpy as np
import pytest

from lmmask.batching import batch_from_ids, make_batch

PAD = 0


def reference_batch(seqs, pad_side="right", token_masks=None, length=None):
  """Independent reference: per-row loops, no slicing tricks."""
  L = length or max(len(s) for s in seqs)
  rows = []
  for i, s in enumerate(seqs):
    n_pad = L - len(s)
    ids = [PAD] * n_pad + list(s) if pad_side == "left" else list(s) + [PAD] * n_pad
    tm = None
    if token_masks is not None:
      m = list(token_masks[i])
      tm = [0] * n_pad + m if pad_side == "left" else m + [0] * n_pad
    inp, tgt, lm, km, pos = [], [], [], [], []
    count = 0
    for t in range(L - 1):
      inp.append(ids[t])
      tgt.append(ids[t + 1])
      real_in, real_tgt = ids[t] != PAD, ids[t + 1] != PAD
      keep = real_in and real_tgt and (tm is None or tm[t + 1] == 1)
      lm.append(1.0 if keep else 0.0)
      km.append(real_in)
      pos.append(count if real_in else max(count - 1, 0) if count else 0)
      if real_in:
        count += 1
    rows.append((inp, tgt, lm, km))
  return [np.array([r[k] for r in rows]) for k in range(4)]


SEQS = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 9, 9, 9, 9, 2], [1, 3]]


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_make_batch_matches_reference(pad_side):
  b = make_batch(SEQS, pad_id=PAD, pad_side=pad_side)
  inp, tgt, lm, km = reference_batch(SEQS, pad_side)
  np.testing.assert_array_equal(b.inputs, inp)
  np.testing.assert_array_equal(b.targets, tgt)
  np.testing.assert_array_equal(b.loss_mask, lm)
  np.testing.assert_array_equal(b.key_mask, km)
  assert b.inputs.dtype == np.int32 and b.targets.dtype == np.int32
  assert b.loss_mask.dtype == np.float32 and b.key_mask.dtype == bool
  np.testing.assert_array_equal(b.segment_ids, km.astype(np.int32))


def test_shift_is_by_one():
  ids = np.array([[1, 10, 11, 12, 2]])
  b = batch_from_ids(ids, pad_id=PAD)
  np.testing.assert_array_equal(b.inputs, [[1, 10, 11, 12]])
  np.testing.assert_array_equal(b.targets, [[10, 11, 12, 2]])
  assert b.shape == (1, 4)


def test_loss_mask_on_targets_key_mask_on_inputs():
  ids = np.array([[1, 10, 2, PAD, PAD]])
  b = batch_from_ids(ids, pad_id=PAD)
  # target PAD at t=2,3 not counted; input PAD at t=3 not a key.
  np.testing.assert_array_equal(b.loss_mask, [[1, 1, 0, 0]])
  np.testing.assert_array_equal(b.key_mask, [[True, True, True, False]])


def test_left_and_right_padding_count_the_same_targets():
  r = make_batch(SEQS, pad_id=PAD, pad_side="right")
  l = make_batch(SEQS, pad_id=PAD, pad_side="left")
  np.testing.assert_array_equal(r.loss_mask.sum(1), l.loss_mask.sum(1))
  for i, s in enumerate(SEQS):
    # The counted targets are the same tokens in the same order.
    np.testing.assert_array_equal(r.targets[i][r.loss_mask[i] > 0], s[1:])
    np.testing.assert_array_equal(l.targets[i][l.loss_mask[i] > 0], s[1:])
    # Positions count real tokens from 0 on both sides (right padding keeps the
    # final <eos> as an input whose target is pad; it is never counted).
    np.testing.assert_array_equal(r.positions[i][r.key_mask[i]][:len(s) - 1], np.arange(len(s) - 1))
    np.testing.assert_array_equal(l.positions[i][l.key_mask[i]], np.arange(len(s) - 1))


def test_planted_bug_loss_mask_from_inputs_counts_pad_targets():
  """The classic bug (loss mask taken from the inputs) counts eos->pad targets under
  right padding, so the two padding sides disagree; the real mask does not."""
  r = make_batch(SEQS, pad_id=PAD, pad_side="right")
  l = make_batch(SEQS, pad_id=PAD, pad_side="left")
  buggy_r = r.key_mask.astype(np.float32)
  buggy_l = l.key_mask.astype(np.float32)
  assert (r.targets[buggy_r > 0] == PAD).any()
  assert buggy_r.sum() != buggy_l.sum()
  assert r.loss_mask.sum() == l.loss_mask.sum()
  assert not (r.targets[r.loss_mask > 0] == PAD).any()


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_token_loss_mask_shifts_with_targets(pad_side):
  masks = [[0, 0, 1, 1, 1], [0, 1, 1], [0, 0, 0, 0, 1, 1, 1], [0, 1]]
  b = make_batch(SEQS, pad_id=PAD, pad_side=pad_side, token_loss_masks=masks)
  _, _, lm, _ = reference_batch(SEQS, pad_side, token_masks=masks)
  np.testing.assert_array_equal(b.loss_mask, lm)
  for i, (s, m) in enumerate(zip(SEQS, masks)):
    want = [t for t, k in zip(s[1:], m[1:]) if k]
    np.testing.assert_array_equal(b.targets[i][b.loss_mask[i] > 0], want)


def test_fixed_length_padding():
  b = make_batch([[1, 2, 3]], pad_id=PAD, length=6)
  assert b.shape == (1, 5)


@pytest.mark.parametrize("call, match", [
    (lambda: make_batch([], pad_id=0), "non-empty"),
    (lambda: make_batch([[1]], pad_id=0), "at least 2"),
    (lambda: make_batch([[1, 2, 3]], pad_id=0, length=2), "length=2"),
    (lambda: make_batch([[1, 2]], pad_id=0, pad_side="middle"), "pad_side"),
    (lambda: make_batch([["a", "b"]], pad_id=0), "non-integer"),
    (lambda: make_batch([[1, 0, 2]], pad_id=0), "already contains pad_id"),
    (lambda: make_batch([[1, 2]], pad_id=50, vocab_size=10), "outside the vocabulary"),
    (lambda: batch_from_ids([[1, 2], [1]], pad_id=0), "rectangular"),
    (lambda: batch_from_ids(np.array([[1.0, 2.0]]), pad_id=0), "integer"),
    (lambda: batch_from_ids(np.array([1, 2, 3]), pad_id=0), "2-D"),
    (lambda: batch_from_ids(np.array([[1]]), pad_id=0), "L >= 2"),
    (lambda: batch_from_ids(np.array([[1, 20]]), pad_id=0, vocab_size=10), r"\[0, 10\)"),
    (lambda: batch_from_ids(np.array([[1, 2]]), pad_id=-1), "negative"),
    (lambda: batch_from_ids(np.array([[1, 2]]), pad_id=0, token_loss_mask=np.ones((1, 3))),
     "shape of ids"),
    (lambda: batch_from_ids(np.array([[1, 2]]), pad_id=0, token_loss_mask=np.array([[0, 2]])),
     "0/1"),
    (lambda: make_batch([[1, 2]], pad_id=0, token_loss_masks=[[1]]), "entries"),
])
def test_bad_input_raises_clear_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()
