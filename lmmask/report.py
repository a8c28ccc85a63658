"""Sweep reports: one row per point from its results.json, tables and PNG plots.

Given a sweep directory and its manifest (the dict `lmmask.sweep` writes to
sweep.json: name, base, fixed, metric, x, facet, points), `collect` reads each
point's results.json, `write_tables` writes results.csv (every scalar) and
results.md (the headline columns, best point in bold, mean ± std over seeds when
`seed` is swept), and `plot` writes the PNGs under DIR/plots. Nothing here knows
how a point is trained, so the tables can be rebuilt from any finished directory.
"""
from __future__ import annotations

import csv
import json
import math
import os

# Columns of results.md (those present); results.csv holds every scalar in results.json.
MD_METRICS = ("step", "train_loss", "val_loss", "val_ppl", "val_accuracy", "best_val_loss",
              "train_seconds")


def fmt(value) -> str:
  """A swept value as point names and tables show it (floats short, bools lowercase)."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def _scalar(v) -> bool:
  return isinstance(v, (int, float, str, bool)) or v is None


def collect(workdir: str, manifest: dict) -> list[dict]:
  """One row per point: its results, else its status ("missing"; for a cluster sweep
  the job's state, e.g. "failed", with its error and log path from jobs.json)."""
  jobs_path = os.path.join(workdir, "jobs.json")  # written by lmmask/cluster.py
  jobs = {}
  if os.path.exists(jobs_path):
    with open(jobs_path) as f:
      jobs = json.load(f)
  rows = []
  for p in manifest["points"]:
    row = {"point": p["name"], **p["overrides"]}
    res_path = os.path.join(workdir, p["name"], "results.json")
    if os.path.exists(res_path):
      with open(res_path) as f:
        res = json.load(f)
      row["status"] = "done"
      row.update({k: v for k, v in res.items() if _scalar(v) and k not in row})
    elif p["name"] in jobs:
      job = jobs[p["name"]]
      row["status"] = job.get("state", "submitted")
      row.update({k: job[k] for k in ("job_id", "error", "stderr") if k in job})
    else:
      row["status"] = "missing"
    rows.append(row)
  return rows


def _columns(rows, manifest) -> list[str]:
  keys = []
  for p in manifest["points"]:
    keys += [k for k in p["overrides"] if k not in keys]
  cols = ["point", *keys, "status"]
  for r in rows:
    cols += [k for k in r if k not in cols]
  return cols


def _cell(v) -> str:
  if v is None or v == "":
    return ""
  if isinstance(v, float):
    return f"{v:.4g}" if math.isfinite(v) else str(v)
  return fmt(v)


def _md_table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _mean_std(xs):
  xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
  if not xs:
    return None, None
  m = sum(xs) / len(xs)
  s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
  return m, s


def seed_summary(rows, keys, metric, seed_key="seed"):
  """Group rows over every swept key but `seed_key`: [(group dict, mean, std, n)]."""
  group_keys = [k for k in keys if k != seed_key]
  groups: dict = {}
  for r in rows:
    if r["status"] != "done":
      continue
    g = tuple(fmt(r.get(k)) for k in group_keys)
    groups.setdefault(g, []).append(r.get(metric))
  out = []
  for g, vals in groups.items():
    m, s = _mean_std(vals)
    out.append((dict(zip(group_keys, g)), m, s, len(vals)))
  return out


def write_tables(workdir: str, rows, manifest) -> None:
  cols = _columns(rows, manifest)
  tmp = os.path.join(workdir, ".tmp_results.csv")
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, "") for k in cols})
  os.replace(tmp, os.path.join(workdir, "results.csv"))

  keys = [c for c in cols[1:] if c != "status" and any(c in p["overrides"]
                                                      for p in manifest["points"])]
  metric = manifest.get("metric") or "val_loss"
  shown = [m for m in (metric, *MD_METRICS) if any(m in r for r in rows)]
  shown = list(dict.fromkeys(shown))
  done = [r for r in rows if r["status"] == "done" and _is_number(r.get(metric))
          and math.isfinite(r[metric])]
  best = min(done, key=lambda r: r[metric])["point"] if done else None
  body = [[("**" + r["point"] + "**") if r["point"] == best else r["point"],
           *[_cell(r.get(k)) for k in keys], r["status"], *[_cell(r.get(m)) for m in shown]]
          for r in rows]
  text = [f"# Sweep {manifest['name']}", "",
          f"Base `{manifest['base']}`; fixed overrides: "
          + (", ".join(f"`{k}={fmt(v)}`" for k, v in manifest["fixed"].items()) or "none")
          + f". {len(done)}/{len(rows)} points done. Best {metric}: "
          + (f"**{best}**." if best else "n/a."), "",
          _md_table(["point", *keys, "status", *shown], body)]
  if "seed" in keys:
    summ = seed_summary(rows, keys, metric)
    gk = [k for k in keys if k != "seed"]
    text += ["", f"## {metric}: mean ± std over seeds", "",
             _md_table([*gk, f"{metric} mean", "std", "n"],
                       [[*[g[k] for k in gk], _cell(m), _cell(s), str(n)]
                        for g, m, s, n in summ])]
  tmp = os.path.join(workdir, ".tmp_results.md")
  with open(tmp, "w") as f:
    f.write("\n".join(text) + "\n")
  os.replace(tmp, os.path.join(workdir, "results.md"))


def read_metrics(point_dir: str) -> list[dict]:
  path = os.path.join(point_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot(workdir: str, rows, manifest, *, per_point: bool = True) -> list[str]:
  """PNGs under DIR/plots: loss curves (one per point and an overlay) and the metric
  against the swept value (mean ± std over seeds, one line per other setting)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  written = []

  # Loss curves.
  fig_all, ax_all = plt.subplots(figsize=(7, 4.5))
  n_curves = 0
  for p in manifest["points"]:
    recs = read_metrics(os.path.join(workdir, p["name"]))
    if not recs:
      continue
    tr = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train" and "loss" in r]
    ev = [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in recs if r["kind"] == "eval"]
    if ev:
      ax_all.plot([e[0] for e in ev], [e[2] for e in ev], lw=1, alpha=0.7,
                  label=p["name"] if len(manifest["points"]) <= 12 else None)
      n_curves += 1
    if per_point:
      fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
      if tr:
        a1.plot(*zip(*tr), lw=1)
      a1.set_title("optimised loss (its own reduction)", fontsize=9)
      a1.set_xlabel("step")
      if ev:
        a2.plot([e[0] for e in ev], [e[1] for e in ev], "o-", ms=3, label="train (token mean)")
        a2.plot([e[0] for e in ev], [e[2] for e in ev], "o-", ms=3, label="val (token mean)")
        a2.legend(fontsize=8)
      a2.set_title("eval loss", fontsize=9)
      a2.set_xlabel("step")
      fig.suptitle(p["name"], fontsize=9)
      fig.tight_layout()
      path = os.path.join(out_dir, f"curve_{p['name']}.png")
      fig.savefig(path, dpi=80)
      plt.close(fig)
      written.append(path)
  if n_curves:
    ax_all.set_xlabel("step")
    ax_all.set_ylabel("val loss (token mean)")
    ax_all.set_title(f"{manifest['name']}: val loss curves ({n_curves} points)")
    if len(manifest["points"]) <= 12:
      ax_all.legend(fontsize=7)
    fig_all.tight_layout()
    path = os.path.join(out_dir, "loss_curves.png")
    fig_all.savefig(path, dpi=90)
    written.append(path)
  plt.close(fig_all)

  # Metric against the swept value.
  keys = []
  for p in manifest["points"]:
    keys += [k for k in p["overrides"] if k not in keys]
  metric = manifest.get("metric") or "val_loss"
  x = manifest.get("x") or next((k for k in keys if k != "seed"), "")
  done = [r for r in rows if r["status"] == "done" and _is_number(r.get(metric))
          and x in r]
  if x and done:
    facet = manifest.get("facet") or ""
    facets = list(dict.fromkeys(fmt(r.get(facet)) for r in done)) if facet else [""]
    line_keys = [k for k in keys if k not in (x, facet, "seed")]
    fig, axes = plt.subplots(1, len(facets), figsize=(4.2 * len(facets), 3.6), squeeze=False,
                             sharey=True)
    numeric_x = all(_is_number(r[x]) for r in done)
    for ax, fv in zip(axes[0], facets):
      sub = [r for r in done if not facet or fmt(r.get(facet)) == fv]
      lines = list(dict.fromkeys(tuple(fmt(r.get(k)) for k in line_keys) for r in sub))
      for lk in lines:
        pts = [r for r in sub if tuple(fmt(r.get(k)) for k in line_keys) == lk]
        xs = list(dict.fromkeys(r[x] for r in pts))
        if numeric_x:
          xs = sorted(xs)
        stats = [_mean_std([r[metric] for r in pts if r[x] == xv]) for xv in xs]
        xpos = xs if numeric_x else list(range(len(xs)))
        nan = lambda v: math.nan if v is None else v  # noqa: E731  (all seeds diverged)
        ax.errorbar(xpos, [nan(s[0]) for s in stats], yerr=[nan(s[1]) for s in stats],
                    marker="o",
                    ms=3, capsize=2, label=",".join(f"{k.split('.')[-1]}={v}"
                                                     for k, v in zip(line_keys, lk)) or None)
        if not numeric_x:
          ax.set_xticks(xpos, [fmt(v) for v in xs])
      if numeric_x and all(v > 0 for v in (r[x] for r in sub)) and \
          max(r[x] for r in sub) / min(r[x] for r in sub) > 20:
        ax.set_xscale("log")
      ax.set_xlabel(x)
      ax.set_title(f"{facet.split('.')[-1]}={fv}" if facet else manifest["name"], fontsize=9)
      if line_keys:
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(metric + (" (mean ± std over seeds)" if "seed" in keys else ""))
    fig.tight_layout()
    path = os.path.join(out_dir, f"{metric}_vs_{x.split('.')[-1]}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
  return written
