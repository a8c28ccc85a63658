"""The empirical entropy floor of the training set, and the alarm that watches it.

With p_emp(x_t | x_<t) = count(x_<=t) / count(x_<t continued by any token), counted
in a trie of the training sequences (the two counts agree when every sequence ends
in <eos>), the floor is the token mean of -log p_emp over the training
targets (every token after <bos>, the ones the loss mask counts). For each prefix,
p_emp is the maximum-likelihood next-token distribution (Gibbs' inequality), so a
model that only sees the prefix - any causally masked model - has a token-mean
training loss over the whole training set (each sequence once, dropout off) of at
least the floor. A value below it means the model saw the future.

A single batch may dip below the floor, and seq_mean or sum losses are on other
scales; the alarm therefore uses the token-mean evaluation of the full training
set that `step.run_evals` computes (``train_loss``), when that set is the training
documents, whole (`DataSource.train_eval_whole`).
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Iterable, Sequence


class _Node:
  __slots__ = ("count", "continued", "children")

  def __init__(self):
    self.count = 0       # sequences through this prefix
    self.continued = 0   # of those, the ones with a next token (the denominator)
    self.children = {}


def build_trie(sequences: Iterable[Sequence[int]]) -> _Node:
  root = _Node()
  for seq in sequences:
    node = root
    node.count += 1
    for tok in seq:
      node.continued += 1
      node = node.children.setdefault(int(tok), _Node())
      node.count += 1
  return root


def floor_terms(sequences: Sequence[Sequence[int]]):
  """(sum over targets of -log p_emp, number of targets); targets = seq[1:]."""
  seqs = [list(s) for s in sequences]
  if not seqs:
    raise ValueError("entropy floor needs at least one training sequence")
  root = build_trie(seqs)
  total, count = 0.0, 0
  for seq in seqs:
    if len(seq) < 2:
      continue
    node = root.children[int(seq[0])]
    for tok in seq[1:]:
      child = node.children[int(tok)]
      total -= math.log(child.count / node.continued)
      count += 1
      node = child
  return total, count


def entropy_floor(sequences: Sequence[Sequence[int]]) -> float:
  """Token-mean -log p_emp(next | full prefix) over the targets of `sequences`."""
  total, count = floor_terms(sequences)
  if count == 0:
    raise ValueError("entropy floor: no sequence has a target (all shorter than 2 tokens)")
  return total / count


class FloorMonitor:
  """Compares each full-train-set evaluation with the floor; alarms when below."""

  def __init__(self, config, data, workdir: str | None = None):
    """data: the DataSource. The monitor is off unless its "train" eval set is its
    training documents, whole (`DataSource.train_eval_whole`; text windows are not)."""
    self.tolerance = float(config.eval.floor_tolerance)
    if self.tolerance < 0:
      raise ValueError(f"config.eval.floor_tolerance must be >= 0, got {self.tolerance}")
    self.floor = None
    if data.train_eval_whole:
      train = data.documents("train")
      self.floor = entropy_floor([train.doc(i)[0] for i in range(len(train))])
    self.first_alarm_step = None
    self.min_margin = math.inf
    self.last_checked_step = None
    if workdir is not None:
      self._restore(os.path.join(workdir, "metrics.jsonl"))

  def _restore(self, path):
    """A resumed run keeps the alarm history of the steps it already logged."""
    if not os.path.exists(path):
      return
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue  # a line cut short by a crash
        if row.get("kind") != "eval" or "floor_margin" not in row:
          continue
        self.min_margin = min(self.min_margin, row["floor_margin"])
        if row.get("floor_alarm") == 1.0 and (self.first_alarm_step is None
                                              or row["step"] < self.first_alarm_step):
          self.first_alarm_step = int(row["step"])

  def final_check(self, step: int, ev: dict) -> None:
    """Check the end-of-run evaluation unless that step was already checked."""
    if step != self.last_checked_step:
      self.check(step, ev)

  def check(self, step: int, ev: dict) -> dict:
    self.last_checked_step = step
    if self.floor is None or "train_loss" not in ev:
      return {}
    margin = float(ev["train_loss"]) - self.floor
    self.min_margin = min(self.min_margin, margin)
    alarm = margin < -self.tolerance
    if alarm:
      if self.first_alarm_step is None:
        self.first_alarm_step = step
        msg = (f"LEAK ALARM at step {step}: token-mean train loss {ev['train_loss']:.5f} is "
               f"below the entropy floor {self.floor:.5f} (by {-margin:.5f} > tolerance "
               f"{self.tolerance}). No causally masked model can do this: the model sees "
               f"future tokens. Check model.causal and the attention mask; run "
               f"launch.py --mode=audit.")
        print("!" * 78 + "\n" + msg + "\n" + "!" * 78, file=sys.stderr, flush=True)
      else:
        print(f"LEAK ALARM (step {step}): train loss {ev['train_loss']:.5f} < entropy floor "
              f"{self.floor:.5f}", file=sys.stderr, flush=True)
    return {"entropy_floor": self.floor, "floor_margin": margin, "floor_alarm": float(alarm)}

  def results(self) -> dict:
    if self.floor is None:
      return {}
    return {"entropy_floor": self.floor, "floor_alarm": self.first_alarm_step is not None,
            "floor_alarm_step": self.first_alarm_step,
            "floor_min_margin": None if math.isinf(self.min_margin) else self.min_margin}
