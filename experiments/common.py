"""Helpers shared by the experiment scripts (no flags: experiments take none).

Every run.py also accepts the single word `tiny` (`python experiments/X/run.py tiny`):
the same code path on a tiny config, a few steps, everything written under a fresh
temporary directory, so a smoke test runs it in seconds and the committed report
next to run.py is never touched.
"""
import json
import math
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


TINY = "tiny"
_tiny_root = []  # the temporary directory of a tiny run, made on first use


def is_tiny(argv=None) -> bool:
  """True when the script was started as `run.py tiny` (the smoke-test path)."""
  return TINY in (sys.argv[1:] if argv is None else argv)


def tiny_root() -> str:
  """One fresh directory per tiny run (under $TMPDIR), so runs never resume each other."""
  if not _tiny_root:
    _tiny_root.append(tempfile.mkdtemp(prefix="lmmask-tiny-"))
  return _tiny_root[0]


def workdir(name: str) -> str:
  """Where an experiment's runs go: $LMMASK_EXPERIMENTS/<name> (default /tmp/lmmask/experiments).

  A tiny run uses its own temporary directory instead: a shrunken config written
  into a real run's workdir would be refused as a different experiment anyway.
  """
  if is_tiny():
    return os.path.join(tiny_root(), "runs", name)
  root = os.environ.get("LMMASK_EXPERIMENTS", "/tmp/lmmask/experiments")
  return os.path.join(root, name)


def output_dir(here: str) -> str:
  """Where a script writes its report: next to run.py, or for a tiny run a temporary
  directory, so a smoke run never overwrites the committed numbers."""
  if not is_tiny():
    return here
  out = os.path.join(tiny_root(), "report")
  os.makedirs(out, exist_ok=True)
  return out


def shrink_sweep(cfg, steps: int = 4, seeds=(0,)):
  """A sweep config cut to `steps` steps per point and the given seeds (tiny runs)."""
  cfg.fixed.train.update({"steps": steps, "log_every": 1, "eval_every": steps,
                          "ckpt_every": steps})
  cfg.fixed.optim.update({"decay_steps": steps, "warmup_steps": 1})
  cfg.grid.seed = list(seeds)
  cfg.plot_each = False  # a PNG per point costs seconds each; the overlay is still drawn
  return cfg


def mean_std(xs):
  xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
  if not xs:
    return math.nan, math.nan
  m = sum(xs) / len(xs)
  s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
  return m, s


def fmt_ms(m, s, digits=3):
  if not math.isfinite(m):
    return "diverged"
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def md_table(header, rows) -> str:
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  return "\n".join(lines)


def copy(src, dst_dir, name=None):
  os.makedirs(dst_dir, exist_ok=True)
  dst = os.path.join(dst_dir, name or os.path.basename(src))
  shutil.copyfile(src, dst)
  return dst


def write_results(here: str, parts, summary) -> None:
  """Write results.md (the lines in `parts`) and summary.json into `here`; print them."""
  with open(os.path.join(here, "results.md"), "w") as f:
    f.write("\n".join(parts) + "\n")
  with open(os.path.join(here, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  print("\n".join(parts))
