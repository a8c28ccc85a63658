"""The n-gram baseline and the entropy floor against brute-force references."""
import math

import numpy as np
import pytest

from lmmask.data import verbs
from lmmask.eval import floor, ngram

BOS, PAD = 1, 0


def random_sequences(seed, n=40, vocab=7):
  """Short sequences over a small vocabulary, so many prefixes are shared."""
  rng = np.random.default_rng(seed)
  return [[BOS] + rng.integers(2, vocab, size=rng.integers(1, 6)).tolist() for _ in range(n)]


# ---------------------------------------------------------------------------
# n-gram

def ref_prob(train, n, k, vocab_size, context, token):
  """Count by scanning every training position (no shared code with AddKNgram)."""
  support = vocab_size - 2
  joint = ctx = 0
  for seq in train:
    for t in range(1, len(seq)):
      c = tuple(([BOS] * (n - 1) + seq[:t])[-(n - 1):]) if n > 1 else ()
      if c == tuple(context):
        ctx += 1
        joint += seq[t] == token
  return (joint + k) / (ctx + k * support)


@pytest.mark.parametrize("n,k", [(1, 0.5), (2, 0.1), (3, 1.0)])
def test_ngram_matches_brute_force(n, k):
  train, test = random_sequences(0), random_sequences(1, n=10)
  m = ngram.AddKNgram(train, n=n, k=k, vocab_size=7, bos_id=BOS, pad_id=PAD)
  total, count = 0.0, 0
  for seq in test:
    for t in range(1, len(seq)):
      c = m.context(seq, t)
      assert c == (tuple(([BOS] * (n - 1) + seq[:t])[-(n - 1):]) if n > 1 else ())
      p = ref_prob(train, n, k, 7, c, seq[t])
      assert m.prob(c, seq[t]) == pytest.approx(p, rel=1e-12)
      total -= math.log(p)
      count += 1
  got = m.nll(test)
  assert got[1] == count and got[0] == pytest.approx(total, rel=1e-12)


class _WrongSupport(ngram.AddKNgram):
  """Twin: normalises over the whole vocabulary but predicts only the support."""

  def __init__(self, *a, **kw):
    super().__init__(*a, **kw)
    self.support = self.vocab_size


def sums_to_one(model, contexts):
  return all(abs(sum(model.prob(c, w) for w in range(model.vocab_size)) - 1) < 1e-9
             for c in contexts)


def test_ngram_is_normalised_and_twin_is_not():
  train = random_sequences(2)
  contexts = [(BOS, BOS), (BOS, 3), (4, 5), (6, 6), (2, 2)]  # seen and unseen
  good = ngram.AddKNgram(train, n=3, k=0.3, vocab_size=7)
  bad = _WrongSupport(train, n=3, k=0.3, vocab_size=7)
  assert sums_to_one(good, contexts)
  assert not sums_to_one(bad, contexts)
  assert good.prob((BOS, BOS), PAD) == 0 and good.prob((BOS, BOS), BOS) == 0


def test_ngram_rejects_bad_settings():
  with pytest.raises(ValueError, match="k must be > 0"):
    ngram.AddKNgram([[1, 2]], n=2, k=0, vocab_size=4)
  with pytest.raises(ValueError, match="n must be"):
    ngram.AddKNgram([[1, 2]], n=0, k=1, vocab_size=4)


def test_baseline_results_on_the_verb_split(tiny):
  corpus = verbs.build_corpus("verbs")
  r = ngram.baseline_results(tiny, corpus)
  for s in ("train", "val", "val_english"):
    assert r[f"baseline_{s}_ppl"] == pytest.approx(math.exp(r[f"baseline_{s}_loss"]))
    assert 1 < r[f"baseline_{s}_ppl"] < len(corpus.vocab) * 2
  # the counted tokens are the model's: every token after <bos>
  m = ngram.AddKNgram([e.ids for e in corpus.train], n=3, k=0.1, vocab_size=len(corpus.vocab))
  assert m.nll([e.ids for e in corpus.val])[1] == sum(len(e.ids) - 1 for e in corpus.val)


# ---------------------------------------------------------------------------
# entropy floor

def ref_floor(seqs):
  """-log #(seqs starting with prefix + next) / #(seqs starting with prefix and longer)."""
  total, count = 0.0, 0
  for s in seqs:
    for t in range(1, len(s)):
      num = sum(1 for o in seqs if o[:t + 1] == s[:t + 1])
      den = sum(1 for o in seqs if o[:t] == s[:t] and len(o) > t)
      total -= math.log(num / den)
      count += 1
  return total / count


def oracle_nll(seqs, context_of):
  """Token-mean NLL of the predictor p(next | context_of(prefix)) fitted on seqs itself."""
  from collections import Counter
  joint, ctx = Counter(), Counter()
  for s in seqs:
    for t in range(1, len(s)):
      joint[(context_of(s[:t]), s[t])] += 1
      ctx[context_of(s[:t])] += 1
  total, count = 0.0, 0
  for s in seqs:
    for t in range(1, len(s)):
      total -= math.log(joint[(context_of(s[:t]), s[t])] / ctx[context_of(s[:t])])
      count += 1
  return total / count


def bigram_floor(seqs):
  """Twin: a 'floor' that conditions on the last token only."""
  return oracle_nll(seqs, lambda prefix: prefix[-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_floor_matches_brute_force_and_bounds_causal_predictors(seed):
  seqs = random_sequences(seed)
  f = floor.entropy_floor(seqs)
  assert f == pytest.approx(ref_floor(seqs), rel=1e-12)
  # the full-prefix empirical predictor attains it; shorter-context predictors do not beat it
  assert oracle_nll(seqs, tuple) == pytest.approx(f, rel=1e-12)
  for n in (1, 2, 3):
    assert oracle_nll(seqs, lambda p, n=n: tuple(p[-n:])) >= f - 1e-12
  # twin: the bigram "floor" is beaten by the full-prefix predictor, so it is no floor
  assert oracle_nll(seqs, tuple) < bigram_floor(seqs) - 1e-3


def test_verb_floor_is_below_the_trained_causal_ngram():
  corpus = verbs.build_corpus("verbs")
  seqs = [e.ids for e in corpus.train]
  f = floor.entropy_floor(seqs)
  assert 0 < f < math.log(len(corpus.vocab))
  for n in (2, 3, 5):
    m = ngram.AddKNgram(seqs, n=n, k=1e-6, vocab_size=len(corpus.vocab))
    total, count = m.nll(seqs)
    assert total / count >= f - 1e-6
  with pytest.raises(ValueError, match="at least one"):
    floor.entropy_floor([])


def test_verbs_report_uses_the_configured_floor_tolerance():
  from lmmask.eval import verbs as eval_verbs
  extras = {"entropy_floor": 1.0}
  below = {"train_loss": 0.9}  # 0.1 under the floor
  for tolerance, flagged in ((0.01, True), (0.5, False)):
    text = eval_verbs.format_extras(below, dict(extras, floor_tolerance=tolerance))
    assert ("BELOW THE FLOOR" in text) == flagged
