"""The one command-line entry point of lmmask (the only file that defines flags).

  python launch.py --config=configs/verbs.py --workdir=/tmp/lmmask/verbs
  python launch.py --mode=eval --workdir=/tmp/lmmask/verbs [--step=N]
  python launch.py --config=configs/verbs.py --workdir=DIR --config.optim.lr=1e-3
  python launch.py --config=configs/sweeps/lr.py --workdir=DIR --mode=sweep [--dry_run]
  python launch.py --mode=aggregate --workdir=DIR   # sweep results.csv/.md + plots
  python launch.py --mode=generate --workdir=DIR --prompt="yo como /" [--temperature=0.8]
  python launch.py --mode=audit --workdir=DIR [--config=...]   # exits 1 on a leak
  python launch.py --mode=prepare --config=configs/text.py --config.data.path=CORPUS --workdir=W
  python launch.py --mode=prepare --config=configs/chat.py:sft   # writes config.data.path
  python launch.py --mode=import --source=HF_DIR_OR.gguf --workdir=DIR   # docs/interop.md
  python launch.py --mode=generate --workdir=DIR --chat --prompt="Hi" --max_new_tokens=64
  python launch.py --mode=export --workdir=DIR --out=HF_DIR [--export_dtype=bfloat16]
  python launch.py --processes=2 --config=configs/verbs.py --workdir=DIR   # 2 local processes
  python launch.py --mode=lower --platform=tpu --config=configs/text.py \
      --config.model.vocab_size=512 [--out=step.mlir]   # the train step's StableHLO
  python launch.py --mode=harness --workdir=DIR --tasks=tasks/mc.yaml,arc_easy [--limit=N]
"""
import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lmmask import cluster, lowering, multiprocess, parallel, sweep, train
from lmmask import config as config_lib
from lmmask import workdir as workdir_lib
from lmmask.data import registry
from lmmask.eval import audit, generate, harness
from lmmask.eval import evaluate as evaluation
from lmmask.interop import convert as interop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/verbs.py[:variant].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sweep", "aggregate", "generate", "audit", "prepare",
                      "import", "export", "lower", "harness"],
    "What to run (sweep/aggregate take a configs/sweeps/ file; prepare builds what "
    "training in --workdir would (text), or writes config.data.path (shards, no --workdir); "
    "import writes a new "
    "workdir from --source; export writes --out from --workdir; lower exports the train "
    "step for --platform and needs no --workdir; harness runs lm-eval --tasks on a "
    "checkpoint).")
_STEP = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest).")
_WHICH = flags.DEFINE_enum("which", "latest", ["latest", "best"],
                           "eval: the latest checkpoints or the best-by-val-loss one.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "sweep: print one launch command per point instead of running.")
_CLUSTER = flags.DEFINE_string(
    "cluster", "", "sweep: submit one job per point through submitit: slurm | local (local "
    "processes in parallel) | auto; empty = run the points one after another here.")
_WAIT = flags.DEFINE_bool("wait", True, "sweep --cluster: wait for the jobs, report each "
                          "point and aggregate (else submit and return; --mode=aggregate later).")
_PROCESSES = flags.DEFINE_integer(
    "processes", 1, "Run N local processes of one multi-process run (train, eval): each is "
    "this command with distributed.mode=manual on a free port; on CPU each gets its own "
    "XLA:CPU devices (mesh.cpu_devices each, 0 = the cores shared out).")
# Generation flags (--mode=generate; --temperature and --sample_seed also in eval).
_PROMPT = flags.DEFINE_multi_string("prompt", [], "generate: a prompt (repeatable), e.g. "
                                    "'yo como /'; <bos> is added.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "generate: a file, one prompt a line.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: 0 = greedy, > 0 samples.")
_TOP_K = flags.DEFINE_integer("top_k", None, "generate: sample from the k likeliest tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "generate: nucleus sampling mass in (0, 1].")
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", None, "generate: tokens to add per prompt (default: the run's "
    "eval.max_new_tokens, sized for its tokenization).")
_SAMPLE_SEED = flags.DEFINE_integer("sample_seed", 0, "generate/eval: PRNG seed for sampling.")
# Interop flags (--mode=import / --mode=export; docs/interop.md).
_SOURCE = flags.DEFINE_string("source", None, "import: a Hugging Face model directory or a "
                              ".gguf file.")
_OUT = flags.DEFINE_string("out", None, "export: the Hugging Face directory to write (must "
                           "not exist); lower: the file for the StableHLO text.")
_PLATFORM = flags.DEFINE_enum("platform", None, list(lowering.PLATFORMS),
                              "lower: the accelerator to lower the train step for.")
_EXPORT_DTYPE = flags.DEFINE_enum("export_dtype", "float32", ["float32", "bfloat16"],
                                  "export: dtype of the written weights.")
_CHAT = flags.DEFINE_bool("chat", False, "generate: render each prompt as a user turn of a "
                          "chat model and print the assistant's reply; harness: apply the "
                          "model's chat template to every request.")
# lm-evaluation-harness flags (--mode=harness; docs/evaluation.md, pip install "lmmask[eval]").
_TASKS = flags.DEFINE_string("tasks", None, "harness: comma-separated lm-eval task names or "
                             "task YAML files, e.g. tasks/mc.yaml,arc_easy.")
_LIMIT = flags.DEFINE_integer("limit", None, "harness: at most this many examples per task.")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "harness: few-shot examples per "
                                    "request (default: each task's own).")
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "harness: a folder of task YAMLs "
                                    "whose task names --tasks may use (e.g. tasks).")


def _print_metrics(title, results):
  print(title)
  for key in ("step", "train_loss", "train_ppl", "train_accuracy", "val_loss", "val_ppl",
              "val_accuracy", "val_english_loss", "val_english_ppl", "val_exact_match",
              "baseline_val_ppl", "entropy_floor", "floor_alarm", "best_step",
              "best_val_loss", "steps_per_sec"):
    if key in results and results[key] is not None:
      v = results[key]
      print(f"  {key:18s} {v:.4f}" if isinstance(v, float) else f"  {key:18s} {v}")


def _parse_flags(argv):
  """absl's flag parsing, but errors in --config (a misspelled override, a bad variant)
  come out as one clear message instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # bad value; a config file error carries its traceback inside
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if any(l.startswith("Traceback") for l in lines):
      lines = [lines[0].rstrip(":"), lines[-1]]
    message = " -- ".join(lines)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
    text = str(e)
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    key = hint.group(2) if hint else (re.findall(r"\w+", text) or ["?"])[0]
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    culprit = [a for a in overrides if key in a.split(".")[1:]] or overrides
    message = (f"{', '.join(culprit)}: the config has no field {key!r}"
               + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
               + "; fix the override's spelling (the fields are defined in the --config file)")
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                   "Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)


def _recorded_cpu_devices():
  """mesh.cpu_devices in the workdir's config.json (a resume keeps its count), if any."""
  path = os.path.join(_WORKDIR.value or "", workdir_lib.CONFIG_FILE)
  if _MODE.value != "train" or not _WORKDIR.value or not os.path.exists(path):
    return None
  with open(path) as f:
    return ((json.load(f).get("mesh") or {}).get("cpu_devices")) or None


def _set_cpu_devices(config, recorded=None):
  """XLA:CPU devices for config.mesh.cpu_devices (0 = auto), set before JAX touches a
  device; the resolved count is written back into the config (config.json keeps it)."""
  if config is None:
    return
  n = config.mesh.cpu_devices
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise app.UsageError(f"mesh.cpu_devices must be an int >= 0 (0 = auto, 1 = off), "
                         f"got {n!r}")
  n, why = parallel.resolve_cpu_devices(config, recorded)
  try:
    parallel.apply_cpu_devices(n)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  config.mesh.cpu_devices = n
  print(f"lmmask: mesh.cpu_devices={n} ({why})", file=sys.stderr, flush=True)


def _join_launcher():
  """A child of --processes in a mode that reads a saved config (eval, generate, audit):
  the launcher's environment says how to join the run."""
  if "LMMASK_NUM_PROCESSES" in os.environ and _MODE.value != "train":
    dist = workdir_lib.load_config(_WORKDIR.value).distributed  # the run's own timeouts
    dist.mode = "manual"
    dist.coordinator_address = dist.num_processes = dist.process_id = None  # from the env
    parallel.initialize_distributed(dist)


def _need_config(mode):
  if _CONFIG.value is None:
    raise app.UsageError(f"--config is required for --mode={mode}")
  return _CONFIG.value


def _data_config():
  """For eval/audit: the workdir's saved config, with the data section of --config when
  one is given (evaluate a checkpoint on other data, e.g. an imported model)."""
  if _CONFIG.value is None:
    return None
  config = workdir_lib.load_config(_WORKDIR.value)
  with config.unlocked():
    config.data = _CONFIG.value.data
  return config


def mode_prepare():
  config = _need_config("prepare")
  if _WORKDIR.value and os.path.isdir(_WORKDIR.value):  # never into another experiment
    workdir_lib.claim(_WORKDIR.value, config_lib.to_dict(config))
  meta = registry.prepare(config, _WORKDIR.value)
  where = os.path.join(_WORKDIR.value, "data") if config.data.corpus == "text" else \
      config.data.path
  print(f"{where}: vocab {meta['vocab_size']}, " + ", ".join(
      f"{k} {v['num_docs']} docs / {v['num_tokens']} tokens (mask density "
      f"{v['mask_density']:.3f})" for k, v in meta["splits"].items()))


def _model_overrides(argv) -> set:
  """model.* fields set on the command line (--config.model.X=V or --config.model.X V)."""
  return {a.split("=", 1)[0][len("--config.model."):] for a in argv
          if a.startswith("--config.model.")}


def mode_train():
  config = _need_config("train")
  # Fine-tuning takes the base's architecture; a model field given on the command
  # line is kept, so that check_init_from refuses it by name when it differs.
  config = workdir_lib.inherit_architecture(config, _model_overrides(sys.argv[1:]))
  results = train.train_and_evaluate(config, _WORKDIR.value)
  if not parallel.is_writer():  # one copy of the results (process 0's)
    return
  _print_metrics(f"results ({_WORKDIR.value}/results.json):", results)
  print(f"val PPL {results['val_ppl']:.2f} (train PPL {results['train_ppl']:.2f})")


def mode_eval():
  results = evaluation.evaluate_checkpoint(
      _WORKDIR.value, _STEP.value, _WHICH.value, config=_data_config(), extras=True,
      temperature=_TEMPERATURE.value, sample_seed=_SAMPLE_SEED.value)
  if not parallel.is_writer():
    return
  _print_metrics(f"eval of {_WHICH.value} checkpoint in {_WORKDIR.value}:", results)
  print(evaluation.format_report(results))
  print(f"val PPL {results['val_ppl']:.4f} (val loss {results['val_loss']:.4f})")
  print(json.dumps(results, default=str), file=sys.stderr)


def mode_sweep():
  sweep_cfg = _need_config("sweep")
  if _DRY_RUN.value:
    print("\n".join(sweep.commands(sweep_cfg, _WORKDIR.value, f"python {sys.argv[0]}")))
    return
  if _CLUSTER.value:
    try:
      rows = cluster.submit(sweep_cfg, _WORKDIR.value, _CLUSTER.value, wait=_WAIT.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    if _WAIT.value:
      _sweep_summary(rows)
      if any(r["status"] == "failed" for r in rows):
        sys.exit(1)
    return
  _sweep_summary(sweep.run(sweep_cfg, _WORKDIR.value))


def mode_aggregate():
  _sweep_summary(sweep.aggregate(_WORKDIR.value, _CONFIG.value))


def _sweep_summary(rows):
  done = sum(r["status"] == "done" for r in rows)
  print(f"{done}/{len(rows)} points done; see {_WORKDIR.value}/results.md, results.csv, plots/")


def mode_generate():
  prompts = list(_PROMPT.value)
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      prompts += [line.strip() for line in f if line.strip()]
  if not prompts:
    raise app.UsageError("--mode=generate needs --prompt=... (repeatable) or --prompt_file")
  for prompt, completion in generate.generate_text(
      _WORKDIR.value, prompts, step=_STEP.value, which=_WHICH.value,
      max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, seed=_SAMPLE_SEED.value, chat=_CHAT.value):
    print(f"{prompt} -> {completion}")


def mode_audit():
  res = audit.audit_workdir(_WORKDIR.value, _data_config() or _CONFIG.value, _STEP.value,
                            _WHICH.value)
  print(f"audit of {res['source']} in {_WORKDIR.value}")
  print(audit.format_audit(res))
  if not res["passed"]:
    sys.exit(1)  # a leak is a failure, for scripts and CI


def mode_import():
  if not _SOURCE.value:
    raise app.UsageError("--mode=import needs --source=<HF model directory or .gguf file>")
  rec = interop.import_checkpoint(_SOURCE.value, _WORKDIR.value)
  d = rec["decoder"]
  print(f"imported {_SOURCE.value} ({rec['family']}: {d['n_layers']} layers, d_model "
        f"{d['d_model']}, vocab {d['vocab_size']}, pad id {rec['data']['pad_id']}) into "
        f"{_WORKDIR.value} at step 0")


def mode_export():
  if not _OUT.value:
    raise app.UsageError("--mode=export needs --out=<new directory>")
  res = interop.export_workdir(_WORKDIR.value, _OUT.value, dtype=_EXPORT_DTYPE.value,
                               step=_STEP.value, which=_WHICH.value)
  print(f"exported step {res['step']} of {_WORKDIR.value} as {res['family']} "
        f"({res['dtype']}{', with tokenizer' if res['tokenizer'] else ', no tokenizer'}) "
        f"to {res['out']}")


def mode_lower():
  config = _need_config("lower")
  if not _PLATFORM.value:
    raise app.UsageError(f"--mode=lower needs --platform={'|'.join(lowering.PLATFORMS)}")
  try:
    summary, text = lowering.lower_train_step(config, _PLATFORM.value)
    if _OUT.value:
      lowering.write_text(_OUT.value, text)
      summary["out"] = os.path.abspath(os.path.expanduser(_OUT.value))
  except (ValueError, FileExistsError) as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps(summary))


def mode_harness():
  if not _TASKS.value:
    raise app.UsageError("--mode=harness needs --tasks=<lm-eval task names or YAML files>")
  path, rec = harness.run_workdir(
      _WORKDIR.value, _TASKS.value, step=_STEP.value, which=_WHICH.value,
      include_path=_INCLUDE_PATH.value or "", limit=_LIMIT.value,
      num_fewshot=_NUM_FEWSHOT.value, apply_chat_template=_CHAT.value)
  print(f"lm-eval {rec['lm_eval_version']} on step {rec['step']} of {_WORKDIR.value}:")
  for key, value in sorted(rec["metrics"].items()):
    print(f"  {key:40s} {value:.4f}")
  print(f"results in {path}")


MODES = {"train": mode_train, "eval": mode_eval, "sweep": mode_sweep,
         "aggregate": mode_aggregate, "generate": mode_generate, "audit": mode_audit,
         "prepare": mode_prepare, "import": mode_import, "export": mode_export,
         "lower": mode_lower, "harness": mode_harness}
NO_WORKDIR = ("prepare", "lower")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MODE.value not in NO_WORKDIR and not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _PROCESSES.value != 1:
    if _MODE.value not in ("train", "eval", "generate", "audit"):
      raise app.UsageError(f"--processes applies to train, eval, generate and audit, not "
                           f"--mode={_MODE.value}")
    cpu = _CONFIG.value.mesh.cpu_devices if _CONFIG.value is not None else 0
    try:
      rc = multiprocess.run(sys.argv[0], sys.argv[1:], _PROCESSES.value,
                            train=_MODE.value == "train", cpu_devices=cpu,
                            workdir=_WORKDIR.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    sys.exit(rc)
  if _MODE.value in ("train", "audit", "lower"):
    _set_cpu_devices(_CONFIG.value, _recorded_cpu_devices())
  _join_launcher()
  MODES[_MODE.value]()


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
