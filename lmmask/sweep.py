"""Sweeps: one base experiment, a grid or list of overrides, one sub-workdir per point.

A sweep config file (configs/sweeps/*.py) has a `get_config()` returning:

  name     str   the sweep's name (titles of tables and plots)
  base     str   experiment config file[:arg] every point starts from, e.g.
                 "configs/verbs.py:tiny" (relative to the cwd, else to the repo root)
  fixed    nested ConfigDict of overrides applied to every point, shaped like the
                 experiment config (fixed.train.steps = 300)
  grid     nested ConfigDict of value lists, shaped like the experiment config
                 (grid.optim.lr = [1e-3, 3e-3]); the cartesian product is taken,
                 axes in sorted dotted-key order
  points   list of {"dotted.key": value} dicts; each is crossed with the grid
                 (an empty list means the grid alone)
  metric   str   the metric the tables mark and the plots show (e.g. "val_loss")
  x        str   dotted key on the x-axis of the metric plot ("" = first grid axis)
  facet    str   dotted key drawn as separate panels of that plot ("" = none)
  plot_each bool optional (default True): one loss-curve PNG per point besides the overlay
  runner   str   optional: "train" (default, train.train_and_evaluate per point, with
                 checkpoints) or "seedvmap" (points differing only in `seed` and
                 `optim.lr` train together under vmap, without checkpoints; seedvmap.py)

Each point runs in DIR/<name>, where <name> is built from its overrides
("reduction=sum,lr=0.001,seed=0"). A point whose results.json covers its
train.steps is skipped, so re-running a crashed sweep finishes it. After the
runs, DIR/results.csv and DIR/results.md hold one row per point, and DIR/plots/
holds the PNG plots (both written by lmmask/report.py). `commands()` instead gives
one launch.py command per point for a cluster scheduler; `aggregate()` then
collects what they wrote.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex

from lmmask import config as config_lib
from lmmask import report, seedvmap, train
from lmmask import workdir as wd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = "sweep.json"
RUNNERS = ("train", "seedvmap")  # train: train_and_evaluate per point; seedvmap: see seedvmap.py
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclasses.dataclass(frozen=True)
class Point:
  name: str                 # sub-workdir name, unique within the sweep
  overrides: dict           # dotted key -> value (grid/list overrides only, not `fixed`)


# ---------------------------------------------------------------------------
# Config files and overrides.

def resolve_path(path: str) -> str:
  """A config path as given (if it exists) or relative to the repo root."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  alt = os.path.join(REPO, path)
  if os.path.exists(alt):
    return alt
  raise ValueError(f"config file {path!r} not found (looked in {os.getcwd()} and {REPO}); "
                   f"give a path like configs/verbs.py")


def load_config_file(spec: str):
  """`get_config(arg)` of a config file given as "path.py[:arg]" (path as given, or
  relative to the repo root)."""
  path, sep, arg = spec.partition(":")
  return config_lib.load_file(resolve_path(path) + sep + arg)


def _flag_value(value) -> str:
  """A value as a launch.py flag takes it (floats round-trip exactly)."""
  if isinstance(value, bool):
    return str(value).lower()
  return repr(value) if isinstance(value, float) else str(value)


def _short_keys(keys) -> dict:
  """Last dotted component, or the full key where two keys share that component."""
  last = [k.split(".")[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def point_name(overrides: dict, short: dict | None = None) -> str:
  if not overrides:
    return "base"
  short = short or _short_keys(list(overrides))
  return ",".join(f"{short[k]}={_SAFE.sub('_', report.fmt(v))}" for k, v in overrides.items())


def _grid_axes(sweep) -> list[tuple[str, list]]:
  grid = config_lib.flatten(sweep.grid) if sweep.get("grid") is not None else {}
  axes = []
  for key in sorted(grid):
    values = grid[key]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
      raise ValueError(f"sweep grid.{key} must be a list of values, got {values!r}")
    if len(values) == 0:
      raise ValueError(f"sweep grid.{key} is empty; give at least one value")
    axes.append((key, list(values)))
  return axes


def expand(sweep) -> list[Point]:
  """The sweep's points: each `points` entry crossed with the grid's product."""
  axes = _grid_axes(sweep)
  listed = list(sweep.get("points") or []) or [{}]
  for i, p in enumerate(listed):
    if not isinstance(p, dict):
      raise ValueError(f"sweep points[{i}] must be a dict of dotted key -> value, got {p!r}")
  keys = []
  for p in listed:
    keys += [k for k in p if k not in keys]
  grid_keys = [k for k, _ in axes]
  clash = sorted(set(keys) & set(grid_keys))
  if clash:
    raise ValueError(f"sweep keys {clash} appear both in grid and in points; use one of them")
  all_keys = keys + grid_keys
  short = _short_keys(all_keys)
  out, seen = [], {}
  for p in listed:
    for combo in itertools.product(*[v for _, v in axes]):
      ov = {k: p[k] for k in keys if k in p}
      ov.update(zip(grid_keys, combo))
      name = point_name(ov, {k: short[k] for k in ov})
      if name in seen:
        raise ValueError(f"two sweep points share the name {name!r} ({seen[name]} and {ov}); "
                         f"make their override values distinct")
      seen[name] = ov
      out.append(Point(name=name, overrides=ov))
  return out


def fixed_overrides(sweep) -> dict:
  return config_lib.flatten(sweep.fixed) if sweep.get("fixed") is not None else {}


def check_sweep(sweep):
  for field in ("name", "base"):
    if not sweep.get(field):
      raise ValueError(f"sweep config needs a non-empty {field!r} (see lmmask/sweep.py); "
                       f"is --config a sweep file under configs/sweeps/?")


def point_config(sweep, point: Point, base=None):
  """The full experiment config of one point: base file + fixed + point overrides."""
  base = load_config_file(sweep.base) if base is None else base
  return config_lib.apply_overrides(base, {**fixed_overrides(sweep), **point.overrides})


# ---------------------------------------------------------------------------
# Running.

def _manifest(sweep, points) -> dict:
  return {"name": sweep.name, "base": sweep.base, "fixed": fixed_overrides(sweep),
          "metric": sweep.get("metric", "val_loss"), "x": sweep.get("x", ""),
          "facet": sweep.get("facet", ""), "plot_each": bool(sweep.get("plot_each", True)),
          "points": [{"name": p.name, "overrides": p.overrides} for p in points]}


def write_manifest(sweep, points, workdir):
  os.makedirs(workdir, exist_ok=True)
  wd.atomic_write_json(os.path.join(workdir, MANIFEST), _manifest(sweep, points))


def point_status(config, point_dir: str) -> str:
  """'done' (results cover train.steps), 'partial' (started) or 'new'.

  Raises ValueError if the directory holds a different experiment.
  """
  cfg_path = os.path.join(point_dir, wd.CONFIG_FILE)
  if not os.path.exists(cfg_path):
    return "new"
  with open(cfg_path) as f:
    saved = json.load(f)
  diff = config_lib.identity_diff(saved, config_lib.to_dict(config))
  if diff:
    lines = "\n".join(f"  {k}: saved={a!r} now={b!r}" for k, a, b in diff)
    raise ValueError(f"sweep point {point_dir} holds a different experiment:\n{lines}\n"
                     f"Use a new sweep --workdir (the old points are left untouched).")
  res_path = os.path.join(point_dir, "results.json")
  if os.path.exists(res_path):
    with open(res_path) as f:
      if json.load(f).get("step") == config.train.steps:
        return "done"
  return "partial"


def run(sweep, workdir: str, *, train_fn=None, log=print) -> list[dict]:
  """Run every unfinished point in-process, then aggregate. Returns the rows."""
  check_sweep(sweep)
  if train_fn is None:
    train_fn = train.train_and_evaluate
  points = expand(sweep)
  base = load_config_file(sweep.base)
  configs = [point_config(sweep, p, base) for p in points]
  status = [point_status(c, os.path.join(workdir, p.name)) for p, c in zip(points, configs)]
  write_manifest(sweep, points, workdir)
  todo = sum(s != "done" for s in status)
  log(f"sweep {sweep.name}: {len(points)} points, {len(points) - todo} already done, "
      f"{todo} to run in {workdir}")
  runner = sweep.get("runner", "train") or "train"
  if runner not in RUNNERS:
    raise ValueError(f"sweep runner {runner!r} unknown; valid: {', '.join(RUNNERS)}")
  if runner == "seedvmap":
    _run_seed_groups(points, configs, status, workdir, log)
    return aggregate(workdir, sweep)
  for i, (p, c, s) in enumerate(zip(points, configs, status)):
    if s == "done":
      continue
    log(f"[{i + 1}/{len(points)}] {p.name}" + (" (resuming)" if s == "partial" else ""))
    train_fn(c, os.path.join(workdir, p.name))
  return aggregate(workdir, sweep)


def _run_seed_groups(points, configs, status, workdir, log):
  """runner="seedvmap": points equal but for seed and lr train together (no checkpoints)."""
  groups: dict = {}
  for p, c, s in zip(points, configs, status):
    if s != "done":
      key = json.dumps({k: v for k, v in p.overrides.items()
                        if k not in seedvmap.VARYING}, sort_keys=True)
      groups.setdefault(key, []).append((p, c))
  for j, members in enumerate(groups.values()):
    names = [p.name for p, _ in members]
    log(f"[group {j + 1}/{len(groups)}] {len(members)} run(s): {names[0]}"
        + (" ..." if len(names) > 1 else ""))
    seedvmap.train_seed_group([c for _, c in members],
                              [os.path.join(workdir, p.name) for p, _ in members], log=log)


def commands(sweep, workdir: str, launcher: str = "python launch.py") -> list[str]:
  """One launch.py command per point (base file + fixed + point overrides as flags)."""
  check_sweep(sweep)
  points = expand(sweep)
  base = load_config_file(sweep.base)
  out = []
  for p in points:
    point_config(sweep, p, base)  # validates every override before printing anything
    flags = [f"--config={shlex.quote(sweep.base)}",
             f"--workdir={shlex.quote(os.path.join(workdir, p.name))}"]
    for k, v in {**fixed_overrides(sweep), **p.overrides}.items():
      flags.append(shlex.quote(f"--config.{k}={_flag_value(v)}"))
    out.append(" ".join([launcher, *flags]))
  write_manifest(sweep, points, workdir)
  return out


# ---------------------------------------------------------------------------
# Aggregation: the tables and plots themselves are lmmask/report.py.

def _load_manifest(workdir: str) -> dict:
  path = os.path.join(workdir, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {MANIFEST} in {workdir}: not a sweep directory (run "
                            f"--mode=sweep, with or without --dry_run, first)")
  with open(path) as f:
    return json.load(f)


def aggregate(workdir: str, sweep=None, *, plots: bool = True, per_point_plots: bool = True):
  """Collect every point's results.json into results.csv / results.md (+ plots)."""
  if sweep is not None:
    check_sweep(sweep)
    manifest = _manifest(sweep, expand(sweep))
  else:
    manifest = _load_manifest(workdir)
  os.makedirs(workdir, exist_ok=True)
  rows = report.collect(workdir, manifest)
  report.write_tables(workdir, rows, manifest)
  if plots:
    report.plot(workdir, rows, manifest,
                per_point=per_point_plots and manifest.get("plot_each", True))
  return rows
