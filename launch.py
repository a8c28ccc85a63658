"""The one command-line entry point of lmmask (the only file that defines flags).

  python launch.py --config=configs/verbs.py --workdir=/tmp/lmmask/verbs
  python launch.py --mode=eval --workdir=/tmp/lmmask/verbs [--step=N]
  python launch.py --config=configs/verbs.py --workdir=DIR --config.optim.lr=1e-3
  python launch.py --mode=prepare --config=configs/chat.py:sft   # writes config.data.path
"""
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/verbs.py[:variant].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "prepare"],
                          "What to run (prepare: write config.data.path from "
                          "config.prepare; needs no --workdir).")
_STEP = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest).")
_WHICH = flags.DEFINE_enum("which", "latest", ["latest", "best"],
                           "eval: the latest checkpoints or the best-by-val-loss one.")


def _print_metrics(title, results):
  print(title)
  for key in ("step", "train_loss", "train_ppl", "train_accuracy", "val_loss", "val_ppl",
              "val_accuracy", "val_english_loss", "val_english_ppl", "steps_per_sec"):
    if key in results and results[key] is not None:
      v = results[key]
      print(f"  {key:18s} {v:.4f}" if isinstance(v, float) else f"  {key:18s} {v}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MODE.value == "prepare":
    if _CONFIG.value is None:
      raise app.UsageError("--config is required for --mode=prepare")
    from lmmask.data import prepare
    meta = prepare.prepare(_CONFIG.value)
    print(f"wrote {_CONFIG.value.data.path}: vocab {meta['vocab_size']}, " + ", ".join(
        f"{k} {v['num_docs']} docs / {v['num_tokens']} tokens (mask density "
        f"{v['mask_density']:.3f})" for k, v in meta["splits"].items()))
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from lmmask import train  # after flag parsing, so --help is fast
  if _MODE.value == "train":
    if _CONFIG.value is None:
      raise app.UsageError("--config is required for --mode=train")
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    _print_metrics(f"results ({_WORKDIR.value}/results.json):", results)
  elif _MODE.value == "eval":
    results = train.evaluate_checkpoint(_WORKDIR.value, _STEP.value, _WHICH.value)
    _print_metrics(f"eval of {_WHICH.value} checkpoint in {_WORKDIR.value}:", results)
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
