"""An lm-evaluation-harness (lm-eval 0.4.13) model backed by lmmask: `LmmaskLM`,
registered as ``lmmask`` when this module is imported with the ``eval`` extra.

  simple_evaluate(model="lmmask", model_args="pretrained=WORKDIR[,step=N]", tasks=[...])
  python launch.py --mode=harness --workdir=W --tasks=my_task.yaml,arc_easy

The model is any workdir (trained or imported), restored by `workdir.restore_state`,
or the live state of a training run (eval.harness_tasks). Every request type:

  log-likelihood: each request is its tokens ``(context + continuation)[-(L+1):]``
    (left truncation at the model's length L, as the hf backend; refused with
    eval.harness_truncation=False). A request whose input tokens are a prefix of
    another's is read from that one's logits (a question's context shared by
    one-token choices, repeated requests: scored once). The remaining sequences are
    sorted by length and packed several per row (`data.packing.first_fit` and
    `fill_rows`, segment ids and restarting positions by `batching.batch_from_segments`,
    the masks by `masks` through `step.forward`), so each is scored exactly as alone.
    is_greedy compares the argmax at every continuation position.
  rolling log-likelihood: lm-eval's disjoint windows of L tokens, the first
    conditioned on `prefix_token_id` (the model's BOS where it has one; lm-eval's
    default, EOS, inflates word perplexities by orders of magnitude), scored as above.
  generation: `decode.generate` (greedy unless the task samples), stopped at EOS,
    cut at the task's stop strings, at most max_gen_toks tokens; chat templates go
    through lm-eval's `apply_chat_template`, rendered by `data.chat_template`.

lm-eval's response cache keys ignore the model, so `run_workdir` keeps one cache
file per (checkpoint, step). Datasets are read offline (HF_DATASETS_OFFLINE=1):
tasks point at local files (see tasks/).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from importlib import metadata

# No network, ever: lm-eval's datasets come from local files (set before `datasets`
# is first imported, which reads these once).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lmmask import batching, decode  # noqa: E402
from lmmask import config as config_lib  # noqa: E402
from lmmask import step as step_lib  # noqa: E402
from lmmask import workdir as wd  # noqa: E402
from lmmask.data import chat_template, hf_tokenizer, packing  # noqa: E402
from lmmask.model import HONOURS_SEGMENTS  # noqa: E402

try:  # the optional extra: lmmask[eval]
  from lm_eval.api import model as lm_model
  from lm_eval.api import registry as lm_registry
except ImportError:  # the module still imports; using it says what to install
  lm_model = lm_registry = None

LM_EVAL_VERSION = "0.4.13"
INSTALL_HINT = ('the lm-evaluation-harness backend needs the optional extra: '
                'pip install "lmmask[eval]" (lm-eval==' + LM_EVAL_VERSION + ')')
HARNESS_DIR = "harness"
OFFLINE_HINT = ("datasets are read offline (HF_DATASETS_OFFLINE=1): point the task at local "
                "files, e.g. in its YAML `dataset_path: json` and `dataset_kwargs: "
                "{data_files: {test: data/my_task.jsonl}}` (a relative path is resolved "
                "against the YAML's folder; see tasks/ for examples)")


def require_lm_eval():
  if lm_model is None:
    raise ImportError(INSTALL_HINT)


def lm_eval_version() -> str | None:
  try:
    return metadata.version("lm_eval")
  except metadata.PackageNotFoundError:
    return None


# ---------------------------------------------------------------------------
# Tokenizers: a pretrained one (data/hf_tokenizer.py) or lmmask's own.

def _encode(tok, text: str, add_special: bool | None) -> list[int]:
  """`text`'s ids. add_special None: the tokenizer's own default (a pretrained
  tokenizer's post-processor, as `tokenizer.encode` in transformers; lmmask's
  tokenizers: <bos> first, as every training document starts)."""
  if isinstance(tok, hf_tokenizer.HFTokenizer):
    return tok.encode(text, add_special_tokens=True if add_special is None else add_special)
  ids = list(tok.encode(text)) if text else []
  return ([tok.bos_id] if add_special is not False else []) + ids


def _decode(tok, ids, skip_special: bool = True) -> str:
  return tok.decode([int(i) for i in ids], skip_special=skip_special)


# ---------------------------------------------------------------------------
# Scoring: packed rows through step.forward.

@jax.jit
def _score(state, batch, pos, tok):
  """Log-prob of token tok[n] at flat position pos[n] of the (B, T) logits, and
  whether it is the argmax there."""
  logits = step_lib.forward(state, state.params, batch)
  flat = logits.reshape(-1, logits.shape[-1])[pos].astype(jnp.float32)
  lp = jnp.take_along_axis(flat, tok[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(flat, axis=-1)
  return lp, jnp.argmax(flat, axis=-1) == tok


def _bucket(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


@dataclasses.dataclass
class Options:
  """The adapter's knobs (config.eval.harness_*, or model_args)."""
  batch_rows: int      # rows per forward; prompts per generate batch
  row_tokens: int      # packed row length (a longer request gets a row of its own)
  packing: bool        # several requests per row
  truncation: bool     # left-truncate over-long requests (else refuse them)
  max_gen_toks: int    # default generation budget


def options_from(config, overrides: dict) -> Options:
  e = config.eval
  base = {"batch_rows": e.harness_batch_rows, "row_tokens": e.harness_row_tokens,
          "packing": e.harness_packing, "truncation": e.harness_truncation,
          "max_gen_toks": e.harness_max_gen_toks}
  for k, v in overrides.items():
    if v is None:
      continue
    if k not in base:
      raise ValueError(f"unknown lmmask model argument {k!r}; valid: pretrained, step, which, "
                       f"{', '.join(base)}")
    if isinstance(base[k], bool):
      base[k] = config_lib.parse_bool(v) if isinstance(v, str) else bool(v)
    else:
      base[k] = int(v)
  for k in ("batch_rows", "row_tokens", "max_gen_toks"):
    if base[k] < 1:
      raise ValueError(f"eval.harness_{k} must be a positive int, got {base[k]}")
  return Options(**base)


class Scorer:
  """Log-likelihoods of token sequences under one model state (no lm-eval needed)."""

  def __init__(self, state, data, max_length: int, options: Options):
    self.data, self.max_length, self.options = data, int(max_length), options
    packed = options.packing and state.model().cfg.attention in HONOURS_SEGMENTS
    self.packing = packed
    # Rows here are packed (or right-padded): the attention must use segment ids.
    self.state = state.replace(opt_state=(), options=dataclasses.replace(
        state.options, keys_are_prefix=False))

  def sequences(self, requests):
    """(tokens ending in the continuation, continuation length) per (ctx, cont) pair,
    left-truncated to L + 1 tokens."""
    out, limit = [], self.max_length + 1
    for i, (ctx, cont) in enumerate(requests):
      whole = list(ctx) + list(cont)
      if not cont:
        raise ValueError(f"request {i} has an empty continuation; nothing to score")
      if len(cont) > self.max_length:
        raise ValueError(f"request {i}: its continuation has {len(cont)} tokens, more than "
                         f"the model's length {self.max_length}; it cannot be scored")
      if len(whole) > limit:
        if not self.options.truncation:
          raise ValueError(f"request {i} has {len(whole)} tokens, more than the model's "
                           f"length {self.max_length} + 1, and eval.harness_truncation is "
                           f"False; shorten the task's context (fewer few-shot examples) or "
                           f"set harness_truncation=True to drop its oldest tokens")
        whole = whole[-limit:]
      out.append((whole, len(cont)))
    return out

  def loglikelihoods(self, requests):
    """[(logprob, is_greedy)] of each (context ids, continuation ids) pair."""
    seqs = self.sequences(requests)
    # Hosts: the sequences actually run. A request whose inputs (its tokens but the
    # last) are a prefix of a host's inputs is read from the host's logits; longest
    # first, so every prefix finds its host.
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), seqs[i][0]))
    trie, hosts, host_of = {}, [], [None] * len(seqs)
    for i in order:
      inputs = seqs[i][0][:-1]
      node = trie
      for t in inputs:
        node = node.get(t)
        if node is None:
          break
      if node is not None and "#" in node:
        host_of[i] = node["#"]
        continue
      h = len(hosts)
      hosts.append(seqs[i][0])
      node = trie
      for t in inputs:
        node = node.setdefault(t, {})
        node.setdefault("#", h)
      host_of[i] = h
    wants = [[] for _ in hosts]  # per host: (request, first input position, targets)
    for i, (whole, n) in enumerate(seqs):
      n_in = len(whole) - 1
      wants[host_of[i]].append((i, n_in - n, whole[-n:]))
    out = [None] * len(seqs)
    for rows, docs in self._rows([len(h) for h in hosts]):
      self._run(rows, docs, hosts, wants, out)
    return out

  def _rows(self, lengths):
    """Batches of rows: (row_len, [[host, ...] per row]), longest rows first."""
    o = self.options
    if self.packing:  # a row of T inputs holds T + 1 tokens; T is at most the model's length
      # Rows no longer than the work needs: a few requests fill batch_rows short rows
      # rather than some of batch_rows long ones (compute is rows x length).
      need = _bucket(-(-sum(lengths) * 21 // (20 * o.batch_rows)), 64)  # 5% for first fit
      length = max(min(o.row_tokens, self.max_length, need) + 1, max(lengths))
      rows, _ = packing.first_fit([max(n, 2) for n in lengths], length)
      rows.sort(key=lambda r: -sum(lengths[h] for h in r))
    else:
      rows = [[h] for h in sorted(range(len(lengths)), key=lambda h: -lengths[h])]
    for b in range(0, len(rows), o.batch_rows):
      chunk = rows[b:b + o.batch_rows]
      longest = max(sum(lengths[h] for h in r) for r in chunk)
      yield min(_bucket(longest - 1, 64), self.max_length), chunk

  def _run(self, row_len, rows, hosts, wants, out):
    o = self.options
    docs = [[np.asarray(hosts[h], np.int32) for h in r] for r in rows]
    # Batch shapes from a few sizes (fewer compilations): full batches, or the last
    # one's rows rounded up to a power of two.
    rows_in_batch = min(o.batch_rows, 1 << (len(docs) - 1).bit_length())
    docs += [[]] * (rows_in_batch - len(docs))
    ids, seg, _ = packing.fill_rows(docs, length=row_len + 1, pad_id=self.data.pad_id)
    batch = batching.batch_from_segments(ids, seg)
    t = row_len
    pos, tok, where = [], [], []
    for r, row in enumerate(rows):
      at = 0
      for h in row:
        for i, first, targets in wants[h]:
          pos.extend(r * t + at + first + np.arange(len(targets)))
          tok.extend(targets)
          where.append((i, len(targets)))
        at += len(hosts[h])
    n = len(pos)
    size = _bucket(n, 256)
    pos = np.asarray(pos + [0] * (size - n), np.int32)
    tok = np.asarray(tok + [0] * (size - n), np.int32)
    lp, greedy = jax.device_get(_score(self.state, batch, jnp.asarray(pos), jnp.asarray(tok)))
    at = 0
    for i, k in where:
      out[i] = (float(np.sum(lp[at:at + k], dtype=np.float64)), bool(greedy[at:at + k].all()))
      at += k


def rolling_windows(tokens, prefix_token: int, max_length: int):
  """lm-eval's disjoint rolling windows [(context, targets)] of a token list."""
  require_lm_eval()
  from lm_eval import utils as lm_utils
  return [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
      token_list=list(tokens), prefix_token=prefix_token, max_seq_len=max_length,
      context_len=1)]


def final_message_prefix(rendered: str, content: str) -> str:
  """`rendered` cut after the final message's content (transformers'
  continue_final_message: the assistant turn is left open for the model)."""
  at = rendered.rfind(content.strip()) if content.strip() else -1
  if at < 0:
    raise ValueError("the chat template does not write the final message's content; "
                     "it cannot be continued")
  return rendered[:at + len(content.strip())]


# ---------------------------------------------------------------------------
# The lm-eval model.

_Base = lm_model.TemplateLM if lm_model is not None else object


class LmmaskLM(_Base):
  """lm-eval's TemplateLM on an lmmask workdir (pretrained=W[,step=N][,which=best]) or,
  from Python, a restored (config, data, state, step) tuple (`restored=`)."""

  def __init__(self, pretrained: str | None = None, step=None, which: str = "latest", *,
               restored=None, batch_size=None, max_batch_size=None, device=None, **overrides):
    require_lm_eval()
    super().__init__()
    del batch_size, max_batch_size, device  # simple_evaluate's torch-backend arguments
    if restored is None:
      if not pretrained:
        raise ValueError("the lmmask model needs pretrained=<workdir> (model_args="
                         "'pretrained=/path/to/workdir')")
      restored = wd.restore_state(pretrained, which, None if step in (None, "") else int(step))
    config, data, state, restored_step = restored
    if not state.options.causal:
      raise ValueError("this model was trained with model.causal=False: it sees the tokens it "
                       "is asked to predict, so lm-eval's log-likelihoods would be leaks; "
                       "evaluate a causal model")
    self.config, self.data, self.step = config, data, int(restored_step)
    self.workdir = pretrained
    tok = data.tokenizer
    if tok is None:
      raise ValueError("this workdir has no tokenizer (imported without one), so task text "
                       "cannot be encoded; import a checkpoint that has a tokenizer")
    self.tok = tok
    self.options = options_from(config, overrides)
    self.cfg = state.model().cfg
    self.scorer = Scorer(state, data, self.cfg.max_len, self.options)
    self.state = state

  # --- what lm-eval asks of a TemplateLM
  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tok.bos_id
    return self.tok.eos_id if bos is None else bos

  @property
  def max_length(self) -> int:
    return self.cfg.max_len

  @property
  def max_gen_toks(self) -> int:
    return self.options.max_gen_toks

  @property
  def world_size(self) -> int:
    # One process: lm-eval gathers ranks with torch otherwise; batches are ours.
    return 1

  @property
  def rank(self) -> int:
    return 0

  @property
  def tokenizer_name(self) -> str:
    return re.sub(r"[^\w.-]", "__", os.path.abspath(self.workdir or "live"))

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    if add_special_tokens is None and self.tok.bos_id is not None:
      bos = _decode(self.tok, [self.tok.bos_id], skip_special=False)
      if bos and string.startswith(bos):  # the text already has its <bos>
        add_special_tokens = False
    ids = _encode(self.tok, string, add_special_tokens)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
    return _decode(self.tok, ids, skip_special_tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    res = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests])
    for (key, _, _), r in zip(requests, res):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, r)
    return res

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    windows, owner = [], []
    for i, req in enumerate(requests):
      (string,) = req.args
      for w in rolling_windows(self.tok_encode(string), self.prefix_token_id, self.max_length):
        windows.append(w)
        owner.append(i)
    scores = self.scorer.loglikelihoods(windows)
    totals = [0.0] * len(requests)
    for i, (lp, _) in zip(owner, scores):
      totals[i] += lp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False):
    from lm_eval.models import utils as lm_utils
    eos = _decode(self.tok, [self.eot_token_id], skip_special=False)
    out = [None] * len(requests)
    groups = {}
    for i, req in enumerate(requests):
      context, kwargs = req.args
      groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(i)
    for key, idx in groups.items():
      kwargs = lm_utils.normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
      until = lm_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      budget = int(kwargs.pop("max_gen_toks"))
      temperature = float(kwargs.get("temperature", 0.0) or 0.0)
      if not kwargs.get("do_sample"):
        temperature = 0.0
      if budget >= self.max_length:
        raise ValueError(f"max_gen_toks={budget} leaves no room for a prompt in the model's "
                         f"length {self.max_length}; lower it")
      ctx_len = self.max_length - budget
      prompts = {}
      for i in idx:
        ids = self.tok_encode(requests[i].args[0])[-ctx_len:]
        prompts[i] = ids or [self.prefix_token_id]
      order = sorted(idx, key=lambda i: (-len(prompts[i]), i))
      for b in range(0, len(order), self.options.batch_rows):
        chunk = order[b:b + self.options.batch_rows]
        rng = jax.random.PRNGKey(int(kwargs.get("seed", 0) or 0)) if temperature > 0 else None
        gen = decode.generate(self.state, [prompts[i] for i in chunk], max_new_tokens=budget,
                              temperature=temperature, rng=rng, eos_id=self.eot_token_id,
                              pad_id=self.data.pad_id, stop_ids=self._stop_ids(until) or None)
        for i, row in zip(chunk, gen.tokens):
          ids = decode.strip_after_eos(row, eos_id=self.eot_token_id, pad_id=self.data.pad_id)
          text = lm_utils.postprocess_generated_text(self.tok_decode(ids), until, None)
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def _stop_ids(self, until) -> list[int]:
    """Tokens whose own text holds a stop string: a row may stop there (its text is cut
    at that stop string anyway, so the answer is the same, only sooner)."""
    key = tuple(sorted(u for u in until if u))
    if not hasattr(self, "_stops"):
      self._stops = {}
    if key not in self._stops:
      n = min(self.tok.vocab_size, self.cfg.vocab_size)
      self._stops[key] = [i for i in range(n)
                          if any(u in _decode(self.tok, [i]) for u in key)] if key else []
    return self._stops[key]

  # --- chat templates (lm-eval's apply_chat_template=True)
  def _template(self):
    t = getattr(self.tok, "chat_template", None)
    if not t:
      raise ValueError("apply_chat_template needs a model with a chat template (an imported "
                       "chat model); this workdir's tokenizer has none")
    return t

  def chat_template(self, chat_template=False):
    return self._template() if chat_template else None

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    specials = getattr(self.tok, "special_tokens", None)
    specials = specials if isinstance(specials, dict) else None
    text = chat_template.render(self._template(), chat_history,
                                add_generation_prompt=add_generation_prompt,
                                special_tokens=specials)
    if add_generation_prompt:
      return text
    return final_message_prefix(text, chat_history[-1]["content"])

  def get_model_info(self) -> dict:
    return {"lmmask_workdir": self.workdir, "lmmask_step": self.step,
            "max_length": self.max_length}


if lm_registry is not None:
  lm_registry.register_model("lmmask")(LmmaskLM)


# ---------------------------------------------------------------------------
# Tasks: lm-eval names, YAML files and folders, loaded offline.

def _load_yaml(path: str) -> dict:
  from lm_eval.tasks import _yaml_loader
  try:
    cfg = _yaml_loader.load_yaml(path)
  except Exception as e:  # noqa: BLE001 -- yaml's errors have many types; one message
    raise ValueError(f"task file {path} does not parse as an lm-eval task YAML: "
                     f"{type(e).__name__}: {e}") from None
  if "task" not in cfg and "group" not in cfg:
    raise ValueError(f"task file {path} has no 'task:' (or 'group:') name")
  return _resolve_data_files(cfg, os.path.dirname(os.path.abspath(path)))


def _resolve_data_files(cfg: dict, folder: str) -> dict:
  """Relative dataset_kwargs.data_files resolved against the YAML's folder, so a
  task folder works from any checkout (lm-eval reads them relative to the cwd)."""
  kw = dict(cfg.get("dataset_kwargs") or {})
  files = kw.get("data_files")
  if files is None:
    return cfg

  def fix(p):
    return p if not isinstance(p, str) or os.path.isabs(p) or "://" in p else \
        os.path.normpath(os.path.join(folder, p))
  if isinstance(files, dict):
    kw["data_files"] = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v)
                        for k, v in files.items()}
  elif isinstance(files, list):
    kw["data_files"] = [fix(x) for x in files]
  else:
    kw["data_files"] = fix(files)
  return dict(cfg, dataset_kwargs=kw)


def _local_index(include_path: str) -> dict:
  """task name -> YAML path for the task files under include_path."""
  if not include_path:
    return {}
  if not os.path.isdir(include_path):
    raise ValueError(f"--include_path={include_path} is not a folder of task YAMLs")
  from lm_eval.tasks import _yaml_loader
  out = {}
  for root, _, files in os.walk(include_path):
    for f in sorted(files):
      if f.endswith((".yaml", ".yml")):
        path = os.path.join(root, f)
        try:
          cfg = _yaml_loader.load_yaml(path, resolve_func=False, recursive=False)
        except Exception:  # noqa: BLE001 -- reported when that task is asked for
          cfg = {"task": os.path.splitext(f)[0]}
        if isinstance(cfg.get("task"), str):
          out[cfg["task"]] = path
  return out


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str, defaults: bool):
  from lm_eval.tasks import TaskManager
  return TaskManager(include_path=include_path or None, include_defaults=defaults)


def split_tasks(tasks) -> list[str]:
  items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
  items = [t.strip() for t in items if t and t.strip()]
  if not items:
    raise ValueError("no tasks given: --tasks=name_or_file.yaml[,...]")
  return items


def _unknown(name: str, include_path: str) -> str:
  hint = f" nor in --include_path={include_path}" if include_path else \
      " (a local task: give its YAML file, or its folder with --include_path)"
  return f"unknown task {name!r}: not an lm-eval task{hint}"


@functools.lru_cache(maxsize=64)
def _named_in_lm_eval(name: str) -> bool:
  """False when no file of lm-eval's task folder spells `name` (so it is no task,
  group or tag there); True means "maybe", settled by lm-eval's index."""
  import lm_eval
  root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
  for folder, _, files in os.walk(root):
    for f in files:
      if f.endswith((".yaml", ".yml", ".py")):
        with open(os.path.join(folder, f), encoding="utf-8", errors="ignore") as fh:
          if name in fh.read():
            return True
  return False


def load_tasks(tasks, include_path: str = "") -> dict:
  """lm-eval's task dict for names and YAML paths, every dataset read offline.
  Errors name the task and say how to fix it; nothing is written."""
  require_lm_eval()
  local = _local_index(include_path)
  specs, names = [], []
  for t in split_tasks(tasks):
    if t.endswith((".yaml", ".yml")):
      if not os.path.isfile(t):
        raise ValueError(f"task file {t} does not exist")
      specs.append(_load_yaml(t))
    elif t in local:
      specs.append(_load_yaml(local[t]))
    else:
      specs.append(t)
      names.append(t)
  for n in names:
    if not _named_in_lm_eval(n):  # cheap: lm-eval's task index takes seconds to build
      raise ValueError(_unknown(n, include_path))
  manager = _task_manager(include_path or "", bool(names))
  for n in names:
    if n not in manager.all_tasks:
      raise ValueError(_unknown(n, include_path))
  loaded = {"tasks": {}, "groups": {}, "group_map": {}}
  for spec in specs:
    name = spec if isinstance(spec, str) else spec.get("task", spec.get("group"))
    try:
      one = manager.load([spec])
    except Exception as e:  # noqa: BLE001 -- datasets and lm-eval raise many types
      text = f"{type(e).__name__}: {e}"
      if re.search(r"offline|Couldn't find|FileNotFound|doesn't exist|not found|"
                   r"Unable to find|ConnectionError|LocalEntryNotFound", text, re.I):
        raise ValueError(f"task {name!r}: its dataset cannot be found offline ({text[:300]}). "
                         f"{OFFLINE_HINT}") from None
      raise ValueError(f"task {name!r} could not be loaded: {text[:500]}") from None
    for k in loaded:
      loaded[k].update(one[k])
  return loaded


def task_hash(task_config: dict) -> str:
  return hashlib.sha256(json.dumps(task_config, sort_keys=True, default=str).encode()
                        ).hexdigest()


def metrics_of(results: dict) -> dict:
  """{task_metric: value} of lm-eval's results (numbers only, no stderr)."""
  out = {}
  for task, ms in results.get("results", {}).items():
    for k, v in ms.items():
      name = k.split(",")[0]
      if "stderr" in name or isinstance(v, bool) or not isinstance(v, (int, float)):
        continue
      out[f"{task}_{name}"] = float(v)
  return out


def evaluate(lm, tasks, *, include_path: str = "", limit=None, num_fewshot=None,
             use_cache: str | None = None, apply_chat_template: bool = False,
             loaded: dict | None = None, log_samples: bool = False) -> dict:
  """lm-eval's simple_evaluate of `lm` on the tasks (loaded offline)."""
  require_lm_eval()
  from lm_eval import evaluator
  loaded = load_tasks(tasks, include_path) if loaded is None else loaded
  task_objs = list(loaded["tasks"].values())
  return evaluator.simple_evaluate(
      model=lm, tasks=task_objs, limit=limit or None, num_fewshot=num_fewshot,
      use_cache=use_cache, apply_chat_template=apply_chat_template, log_samples=log_samples,
      task_manager=_task_manager(include_path or "", False), torch_random_seed=None,
      bootstrap_iters=0)


def summary(results: dict, **extra) -> dict:
  """What STEP.json keeps: metrics, task config hashes, versions, settings."""
  configs = results.get("configs", {})
  return {"lm_eval_version": lm_eval_version(), "results": results.get("results", {}),
          "metrics": metrics_of(results), "n-shot": results.get("n-shot", {}),
          "versions": results.get("versions", {}),
          "task_hashes": {t: task_hash(c) for t, c in configs.items()},
          "configs": configs, **extra}


def cache_path(workdir: str, which: str, step: int) -> str:
  """One response cache per checkpoint and step: lm-eval's keys ignore the model."""
  return os.path.join(workdir, HARNESS_DIR, "cache", f"{which}_step{step}")


def run_workdir(workdir: str, tasks, *, step: int | None = None, which: str = "latest",
                include_path: str = "", limit=None, num_fewshot=None,
                apply_chat_template: bool = False, model_args: dict | None = None
                ) -> tuple[str, dict]:
  """Evaluate a workdir's checkpoint on the tasks; results merged into
  W/harness/STEP.json. Tasks and the checkpoint are checked before anything is
  written; a failed run removes the cache file it started. model_args: the
  adapter's knobs (batch_rows, row_tokens, packing, truncation, max_gen_toks) over
  the workdir's eval.harness_*. Returns (path, summary)."""
  require_lm_eval()
  loaded = load_tasks(tasks, include_path)          # unknown task, bad YAML, offline data
  restored = wd.restore_state(workdir, which, step)  # no checkpoint
  lm = LmmaskLM(workdir, restored=restored, **(model_args or {}))
  cache = cache_path(workdir, which, lm.step)
  made = [p for p in (os.path.join(workdir, HARNESS_DIR), os.path.dirname(cache))
          if not os.path.exists(p)]
  db = cache + "_rank0.db"
  new_db = not os.path.exists(db)
  try:
    results = evaluate(lm, tasks, include_path=include_path, limit=limit,
                       num_fewshot=num_fewshot, use_cache=cache,
                       apply_chat_template=apply_chat_template, loaded=loaded)
  except BaseException:
    if new_db and os.path.exists(db):  # a failed run leaves the workdir as it was
      os.unlink(db)
    for p in reversed(made):
      if os.path.isdir(p) and not os.listdir(p):
        os.rmdir(p)
    raise
  out = os.path.join(workdir, HARNESS_DIR, f"{lm.step}.json")
  record = summary(results, step=lm.step, which=which, workdir=os.path.abspath(workdir),
                   limit=limit, num_fewshot=num_fewshot, cache=db,
                   apply_chat_template=bool(apply_chat_template))
  if os.path.exists(out):  # other tasks of the same step are kept
    with open(out) as f:
      old = json.load(f)
    for key in ("results", "metrics", "n-shot", "versions", "task_hashes", "configs"):
      record[key] = {**old.get(key, {}), **record[key]}
  wd.atomic_write_json(out, record)
  return out, record


def run_live(config, data, state, step: int) -> dict:
  """eval.harness_tasks on the live weights of a training run: {task_metric: value}."""
  e = config.eval
  lm = LmmaskLM(restored=(config, data, state, step))
  results = evaluate(lm, e.harness_tasks, include_path=e.harness_include_path,
                     limit=e.harness_limit or None,
                     num_fewshot=None if e.harness_num_fewshot < 0 else e.harness_num_fewshot)
  return metrics_of(results)
