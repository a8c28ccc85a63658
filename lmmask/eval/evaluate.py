"""Checkpoint evaluation and generation for every corpus.

The teacher-forced numbers (loss, PPL, accuracy on each eval set) are the same
for every corpus; what else is worth reporting is the corpus's own business and
lives in one module per corpus (`EXTRAS`): verbs (exact match, n-gram baseline,
entropy floor, length buckets), text (PPL by document length, continuations),
shards/chat (assistant-token loss, exact match of assistant replies). The
entropy floor is computed for any corpus whose training set is small enough.
"""
from __future__ import annotations

from lmmask import parallel
from lmmask import step as step_lib
from lmmask import workdir as wd
from lmmask.eval import chat as eval_chat
from lmmask.eval import floor as floor_lib
from lmmask.eval import text as eval_text
from lmmask.eval import verbs as eval_verbs

# Each module has checkpoint_extras (--mode=eval) and format_extras (their text).
EXTRAS = {"verbs": eval_verbs, "text": eval_text, "shards": eval_chat}
# End-of-run keys of results.json beyond the eval sets' (text adds none: its extras
# generate text, worth the time only when asked for).
RESULTS_EXTRAS = {"verbs": eval_verbs.results_extras, "shards": eval_chat.results_extras}


def _extras(data):
  """The corpus's own evaluation module, or None: a corpus with none gets the
  teacher-forced numbers and the entropy floor, from the DataSource contract alone."""
  return EXTRAS.get(data.name)


def host_state(state):
  """`state` itself, or, when its arrays span several processes, a whole copy on every
  process: generation and the other extras run per process on host arrays (they are
  small, and every process then computes the same numbers)."""
  if parallel.spans_processes(state.params) is None:
    return state
  return state.replace_from_tree(parallel.gather_to_host(state.checkpoint_tree()))


def results_extras(config, state, data, floor_monitor, results) -> dict:
  """Extra keys for results.json: floor alarm and the corpus's own end-of-run extras."""
  floor_monitor.final_check(results["step"], results)  # covers a resume with no new steps
  out = dict(floor_monitor.results())
  if data.name in RESULTS_EXTRAS:
    out.update(RESULTS_EXTRAS[data.name](config, host_state(state), data))
  return out


def entropy_floor(config, data) -> dict:
  """The floor of the training documents where affordable, else why not."""
  train = data.documents("train")
  total = sum(int(n) for n in train.doc_lengths())
  cap = config.eval.floor_max_tokens
  if total > cap:
    return {"entropy_floor": None, "entropy_floor_reason":
            f"unavailable: the training set has {total} tokens, more than "
            f"eval.floor_max_tokens={cap} (the floor needs a trie of every prefix)"}
  docs = [[int(t) for t in train.doc(i)[0]] for i in range(len(train))]
  return {"entropy_floor": floor_lib.entropy_floor(docs)}


def evaluate_checkpoint(workdir: str, step: int | None = None, which: str = "latest", *,
                        config=None, extras: bool = False, temperature: float = 0.0,
                        sample_seed: int = 0) -> dict:
  """Restore a workdir's checkpoint (its saved config unless `config` is given) and
  evaluate it on every eval set; with extras=True add the corpus's own extras."""
  config, data, state, restored = wd.restore_state(workdir, which, step, config=config)
  out = {"step": restored, **step_lib.run_evals(state, data.eval_sets())}
  if extras:
    out["corpus"] = data.name
    module = _extras(data)
    more = {} if module is None else module.checkpoint_extras(
        config, host_state(state), data, temperature=temperature, sample_seed=sample_seed)
    if "entropy_floor" not in more:
      more.update(entropy_floor(config, data))
    out["extras"] = more
  return out


def format_report(results: dict) -> str:
  """The corpus's extras as text (the teacher-forced numbers are printed by launch)."""
  extras = results.get("extras")
  if not extras:
    return ""
  module = EXTRAS.get(results["corpus"])
  text = "" if module is None else module.format_extras(results, extras)
  if results["corpus"] != "verbs":
    if extras.get("entropy_floor") is not None:
      text += f"\n  entropy floor (train) {extras['entropy_floor']:.4f}"
    else:
      text += f"\n  entropy floor: {extras.get('entropy_floor_reason')}"
  return text
