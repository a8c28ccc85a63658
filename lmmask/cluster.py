"""Sweeps on a cluster: one scheduler job per sweep point, through submitit.

  python launch.py --mode=sweep --config=configs/sweeps/lr.py --workdir=DIR --cluster=slurm
  python launch.py --mode=aggregate --workdir=DIR      # whenever jobs have finished

submitit (https://github.com/facebookincubator/submitit) does the scheduling:
`--cluster=slurm` submits to SLURM, `local` runs the jobs as local processes in
parallel (what the tests use), `auto` picks SLURM where `sbatch` exists. The
sweep file's optional `executor` dict is passed to submitit's
`update_parameters` (e.g. {"timeout_min": 120, "slurm_partition": "gpu",
"gpus_per_node": 1, "cpus_per_task": 8}).

Each point is one job training into DIR/<point> with `train.train_and_evaluate`,
so a job is resumable like any run: a preempted or timed-out SLURM job is
requeued by submitit (`checkpoint`) and continues from its latest checkpoint,
and re-submitting the sweep submits only the points not done. Each job's stdout
and stderr are under DIR/jobs/ (its path is printed and kept in DIR/jobs.json);
with --wait (the default) every point's outcome is reported, a failure with its
error and log, and the tables are written as `--mode=aggregate` writes them.
"""
from __future__ import annotations

import os
import time

import submitit

from lmmask import config as config_lib
from lmmask import parallel, sweep, train
from lmmask import workdir as wd

CLUSTERS = ("local", "slurm", "auto")
JOBS_FILE = "jobs.json"  # point -> job id, log paths and state (report.collect reads it)


class PointJob(submitit.helpers.Checkpointable):
  """One sweep point (a picklable callable: submitit runs it in the job's process).
  As a Checkpointable it is resubmitted with the same arguments on preemption or
  timeout; train_and_evaluate then resumes from the point's latest checkpoint."""

  def __call__(self, config_dict: dict, point_dir: str) -> dict:
    config = config_lib.upgrade(config_dict)
    # A fresh process per job: its CPU devices can still be chosen (0 = auto).
    n, _ = parallel.resolve_cpu_devices(config, _recorded(point_dir))
    parallel.apply_cpu_devices(n)
    config.mesh.cpu_devices = n
    results = train.train_and_evaluate(config, point_dir)
    return {k: v for k, v in results.items() if isinstance(v, (int, float, str, type(None)))}


def _recorded(point_dir):
  path = os.path.join(point_dir, wd.CONFIG_FILE)
  if not os.path.exists(path):
    return None
  return (wd.read_json(path, "").get("mesh") or {}).get("cpu_devices") or None


def executor(cluster: str, folder: str, parameters: dict | None = None):
  if cluster not in CLUSTERS:
    raise ValueError(f"--cluster={cluster!r} unknown; valid: {', '.join(CLUSTERS)} "
                     f"(or leave it empty to run the points one after another here)")
  ex = submitit.AutoExecutor(folder=folder, cluster=None if cluster == "auto" else cluster)
  params = dict(parameters or {})
  params.setdefault("timeout_min", 24 * 60)
  ex.update_parameters(**params)
  return ex


def _error_line(e: BaseException) -> str:
  lines = [l for l in str(e).splitlines() if l.strip()]
  err = [l for l in lines if "Error" in l or "error" in l]
  return (err[-1] if err else (lines[-1] if lines else type(e).__name__)).strip()[:300]


def submit(sweep_cfg, workdir: str, cluster: str, *, wait: bool = True,
           timeout_s: float | None = None, log=print) -> list[dict]:
  """Submit every unfinished point as a job; with `wait`, report each point's outcome
  and aggregate. Returns the aggregated rows (wait) or the job records."""
  sweep.check_sweep(sweep_cfg)
  points = sweep.expand(sweep_cfg)
  base = sweep.load_config_file(sweep_cfg.base)
  configs = [sweep.point_config(sweep_cfg, p, base) for p in points]
  for c in configs:
    config_lib.validate(c)  # a bad point fails here, not in a queue hours later
  status = [sweep.point_status(c, os.path.join(workdir, p.name)) for p, c in zip(points, configs)]
  sweep.write_manifest(sweep_cfg, points, workdir)
  jobs_dir = os.path.join(workdir, "jobs")
  params = sweep_cfg.get("executor")
  ex = executor(cluster, os.path.join(jobs_dir, "%j"),
                params.to_dict() if hasattr(params, "to_dict") else params)
  records_path = os.path.join(workdir, JOBS_FILE)
  records = wd.read_json(records_path, "") if os.path.exists(records_path) else {}
  todo = [(p, c) for p, c, s in zip(points, configs, status) if s != "done"]
  log(f"sweep {sweep_cfg.name}: {len(points)} points, {len(points) - len(todo)} already done, "
      f"{len(todo)} submitted to {cluster} ({workdir})")
  jobs = []
  ex.update_parameters(name=f"lmmask-{sweep_cfg.name}"[:120])
  with ex.batch():  # one submission (a SLURM job array where the cluster has one)
    for p, c in todo:
      jobs.append(ex.submit(PointJob(), config_lib.to_dict(c), os.path.join(workdir, p.name)))
  for (p, _), job in zip(todo, jobs):
    records[p.name] = {"job_id": str(job.job_id), "stdout": str(job.paths.stdout),
                       "stderr": str(job.paths.stderr), "state": "submitted"}
    log(f"  {p.name}: job {job.job_id}, log {job.paths.stderr}")
  wd.atomic_write_json(records_path, records)
  if not wait:
    log(f"collect the results with: python launch.py --mode=aggregate --workdir={workdir}")
    return [dict(point=k, **v) for k, v in records.items()]
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  for (p, _), job in zip(todo, jobs):
    rec = records[p.name]
    try:
      left = None if deadline is None else max(1.0, deadline - time.monotonic())
      _wait(job, left)
      job.result()
      rec["state"] = "done"
      log(f"  {p.name}: done")
    except Exception as e:  # noqa: BLE001 - a job's failure is reported, the sweep goes on
      rec["state"] = "failed"
      rec["error"] = _error_line(e)
      log(f"  {p.name}: FAILED: {rec['error']} (log: {rec['stderr']})")
  wd.atomic_write_json(records_path, records)
  failed = [k for k, v in records.items() if v.get("state") == "failed"]
  if failed:
    log(f"{len(failed)} point(s) failed: {', '.join(failed)}; fix the cause and rerun the same "
        f"command (finished points are skipped, failed ones resume from their checkpoints)")
  return sweep.aggregate(workdir, sweep_cfg)


def _wait(job, timeout_s):
  """job.wait() with a deadline (submitit's own wait has none)."""
  start = time.monotonic()
  while not job.done():
    if timeout_s is not None and time.monotonic() - start > timeout_s:
      job.cancel(check=False)
      raise TimeoutError(f"job {job.job_id} did not finish within {timeout_s:.0f} s; cancelled")
    time.sleep(0.5)
