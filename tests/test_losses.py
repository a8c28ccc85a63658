"""lmmask.losses against float64 numpy loops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmmask import losses


def loop_losses(logits, targets, mask):
  """float64 reference for all four reductions, with explicit loops."""
  logits = np.asarray(logits, np.float64)
  B, T, V = logits.shape
  seq_sums, seq_counts = [], []
  for b in range(B):
    s = c = 0.0
    for t in range(T):
      if mask[b, t] > 0:
        row = logits[b, t]
        mx = max(row)
        logz = mx + math.log(sum(math.exp(x - mx) for x in row))
        s += mask[b, t] * (logz - row[targets[b, t]])
        c += mask[b, t]
    seq_sums.append(s)
    seq_counts.append(c)
  total, count = sum(seq_sums), sum(seq_counts)
  counted = [i for i in range(B) if seq_counts[i] > 0]
  return {
      "token_mean": total / count if count else 0.0,
      "seq_mean": total / len(counted) if counted else 0.0,
      "seq_mean_of_means": (sum(seq_sums[i] / seq_counts[i] for i in counted) / len(counted)
                            if counted else 0.0),
      "sum": total,
  }


def random_case(seed=0, B=5, T=6, V=11):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  targets = rng.integers(0, V, (B, T))
  mask = (rng.random((B, T)) > 0.4).astype(np.float32)
  mask[1] = 0.0    # an all-pad row
  mask[0] = 1.0    # a full row
  return logits, targets, mask


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reductions_match_float64_loops(reduction, seed):
  logits, targets, mask = random_case(seed)
  loss, metrics = losses.masked_cross_entropy(logits, targets, mask, reduction=reduction)
  ref = loop_losses(logits, targets, mask)
  np.testing.assert_allclose(float(loss), ref[reduction], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["nll_sum"]), ref["sum"], rtol=1e-5)
  assert float(metrics["num_tokens"]) == mask.sum()
  assert float(metrics["num_seqs"]) == (mask.sum(1) > 0).sum()


def test_reductions_differ_so_the_test_can_tell_them_apart():
  logits, targets, mask = random_case(3)
  vals = {r: float(losses.masked_cross_entropy(logits, targets, mask, reduction=r)[0])
          for r in losses.REDUCTIONS}
  assert len({round(v, 4) for v in vals.values()}) == 4


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
def test_all_zero_mask_gives_zero_not_nan(reduction):
  logits, targets, _ = random_case()
  mask = np.zeros(targets.shape, np.float32)
  loss, metrics = losses.masked_cross_entropy(logits, targets, mask, reduction=reduction)
  assert float(loss) == 0.0 and float(metrics["num_tokens"]) == 0.0
  assert float(metrics["accuracy"]) == 0.0
  g = jax.grad(lambda x: losses.masked_cross_entropy(x, targets, mask, reduction=reduction)[0])(
      jnp.asarray(logits))
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) == 0.0


def test_masked_target_value_does_not_matter():
  logits, targets, mask = random_case()
  t2 = np.where(mask > 0, targets, -100)
  t3 = np.where(mask > 0, targets, 10_000)
  a = losses.masked_cross_entropy(logits, targets, mask)[0]
  b = losses.masked_cross_entropy(logits, t2, mask)[0]
  c = losses.masked_cross_entropy(logits, t3, mask)[0]
  assert float(a) == float(b) == float(c)


def test_masked_loss_unaffected_by_pad_logits():
  logits, targets, mask = random_case()
  noisy = np.where(mask[..., None] > 0, logits, 1e4 * np.random.default_rng(9).normal(
      size=logits.shape)).astype(np.float32)
  for r in losses.REDUCTIONS:
    np.testing.assert_allclose(float(losses.masked_cross_entropy(logits, targets, mask, reduction=r)[0]),
                               float(losses.masked_cross_entropy(noisy, targets, mask, reduction=r)[0]),
                               rtol=1e-6)


def test_drill_unmasked_pad_reports_0_7x():
  """30% of targets are pad and the model predicts pad perfectly: forgetting the
  loss mask divides the real loss by all positions, reporting 0.7x the true loss."""
  B, T, V, PAD = 10, 10, 7, 0
  rng = np.random.default_rng(0)
  targets = rng.integers(1, V, (B, T))
  targets[:, 7:] = PAD                         # exactly 30% pad targets
  logits = rng.normal(size=(B, T, V)).astype(np.float32)
  logits[:, 7:, PAD] = 50.0                    # pad is predicted with ~zero loss
  real = (targets != PAD).astype(np.float32)
  true_loss = float(losses.masked_cross_entropy(logits, targets, real)[0])
  unmasked = float(losses.masked_cross_entropy(logits, targets, np.ones_like(real))[0])
  np.testing.assert_allclose(unmasked / true_loss, 0.7, rtol=1e-4)


def test_token_mean_gradient_is_softmax_minus_onehot():
  logits, targets, mask = random_case(4)
  g = np.asarray(jax.grad(lambda x: losses.masked_cross_entropy(x, targets, mask)[0])(
      jnp.asarray(logits)), np.float64)
  x = logits.astype(np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(x.shape[-1])[targets]
  want = (p - onehot) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(g, want, atol=1e-6)


def test_bf16_logits_computed_in_float32():
  logits, targets, mask = random_case(5)
  lb = jnp.asarray(logits, jnp.bfloat16)
  loss, _ = losses.masked_cross_entropy(lb, targets, mask)
  assert loss.dtype == jnp.float32
  ref = loop_losses(np.asarray(lb.astype(jnp.float32)), targets, mask)["token_mean"]
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_accuracy_counts_only_masked_tokens():
  logits = np.zeros((1, 3, 4), np.float32)
  logits[0, 0, 2] = logits[0, 1, 1] = logits[0, 2, 3] = 5.0
  targets = np.array([[2, 0, 3]])
  mask = np.array([[1.0, 1.0, 0.0]], np.float32)
  _, m = losses.masked_cross_entropy(logits, targets, mask)
  assert float(m["accuracy"]) == 0.5 and float(m["num_correct"]) == 1.0


def test_unknown_reduction_names_valid_ones():
  logits, targets, mask = random_case()
  with pytest.raises(ValueError, match="token_mean, seq_mean, seq_mean_of_means, sum"):
    losses.masked_cross_entropy(logits, targets, mask, reduction="mean")


def test_shape_mismatch_is_reported():
  logits, targets, mask = random_case()
  with pytest.raises(ValueError, match="must both be"):
    losses.masked_cross_entropy(logits, targets[:, :-1], mask[:, :-1])
