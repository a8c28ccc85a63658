"""Helpers shared by the experiment scripts (no flags: experiments take none)."""
import json
import math
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def workdir(name: str) -> str:
  """Where an experiment's runs go: $LMMASK_EXPERIMENTS/<name> (default /tmp/lmmask/experiments)."""
  root = os.environ.get("LMMASK_EXPERIMENTS", "/tmp/lmmask/experiments")
  return os.path.join(root, name)


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
  """Write results.md (the lines in `parts`) and summary.json next to run.py; print."""
  with open(os.path.join(here, "results.md"), "w") as f:
    f.write("\n".join(parts) + "\n")
  with open(os.path.join(here, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  print("\n".join(parts))
