"""Chat prepare (role tags + mask rules), the zero-mask skip, init_from, resume, greedy loop."""
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from lmmask import checkpoint as ckpt
from lmmask import step as step_lib
from lmmask import train
from lmmask import workdir as workdir_lib
from lmmask.data import prepare, registry, shards, synthetic_chat, tokenizer
from lmmask.eval import chat as eval_chat


def chat_config(arg):
  return load_config("chat.py", arg)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  """Tiny text + chat datasets sharing one tokenizer, and a tiny base run."""
  root = tmp_path_factory.mktemp("chat")
  text, chat = str(root / "text"), str(root / "chat")
  pre = chat_config(f"pretrain,tiny,data={text}")
  sft = chat_config(f"sft,tiny,data={chat}")
  sft.data.tokenizer = text
  with warnings.catch_warnings():  # tiny sizes drop a few long records, with a warning
    warnings.simplefilter("ignore", UserWarning)
    prepare.prepare(pre)
    prepare.prepare(sft)
  base = str(root / "base")
  train.train_and_evaluate(pre, base)
  return {"root": root, "text": text, "chat": chat, "base": base}


# --- mask rules -------------------------------------------------------------

def _reference_mask(ids, tok):
  """State machine over the token stream, written from the rules in prepare.py."""
  mask, role = [], None
  for t in ids:
    if t in tok.tag_ids:          # an opening tag never counts
      role = next(r for r, i in tok.role_id.items() if i == t)
      mask.append(0)
    elif t == tok.end_id:         # the closing tag counts for the assistant only
      mask.append(int(role == "assistant"))
      role = None
    elif t == tok.bos_id:
      mask.append(0)
    else:
      mask.append(int(role == "assistant"))
  return mask


def _mask_with_opening_tag(tok, messages):
  """Planted bug: the opening <|assistant|> tag is counted too (the model then learns
  to emit role tags itself)."""
  ids, mask = prepare.encode_conversation(tok, messages)
  return ids, [1 if t == tok.role_id["assistant"] else m for t, m in zip(ids, mask)]


def _check_mask_properties(tok, ids, mask, messages):
  assert len(ids) == len(mask)
  assert all(m == 0 for t, m in zip(ids, mask) if t == tok.role_id["assistant"])
  n_asst = sum(len(tok.encode_text(m["content"])) + 1 for m in messages
               if m["role"] == "assistant")
  assert sum(mask) == n_asst


def test_mask_rules_match_reference_and_catch_planted_bug(datasets):
  tok = tokenizer.Tokenizer.load_chat(datasets["chat"])
  rng = np.random.default_rng(0)
  convs = [synthetic_chat.conversation(rng)["messages"] for _ in range(60)]
  assert any(m[0]["role"] == "system" for m in convs)
  assert any(sum(x["role"] == "assistant" for x in m) == 2 for m in convs)  # multi-turn
  for msgs in convs:
    ids, mask = prepare.encode_conversation(tok, msgs)
    assert mask == _reference_mask(ids, tok)
    _check_mask_properties(tok, ids, mask, msgs)
    assert tok.decode(ids, skip_special=False).count("<|assistant|>") == sum(
        m["role"] == "assistant" for m in msgs)
  ids, bad = _mask_with_opening_tag(tok, convs[0])
  assert bad != _reference_mask(ids, tok)
  with pytest.raises(AssertionError):
    _check_mask_properties(tok, ids, bad, convs[0])


def test_plain_text_encoding(datasets):
  tok = tokenizer.Tokenizer.load_chat(datasets["text"])
  ids, mask = prepare.encode_plain_text(tok, "what is 3 + 4? 7.")
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask == [1] * len(ids)
  assert tok.decode(ids) == "what is 3 + 4? 7."
  meta = shards.read_meta(datasets["text"])
  assert meta["kind"] == "text" and meta["splits"]["train"]["mask_density"] == 1.0
  chat_meta = shards.read_meta(datasets["chat"])
  assert chat_meta["tokenizer_sha256"] == meta["tokenizer_sha256"]  # reused, not retrained
  assert 0.1 < chat_meta["splits"]["train"]["mask_density"] < 0.5


@pytest.mark.parametrize("line, match", [
    ('{"messages": []}', "'messages' is empty"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'; valid roles"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},'
     ' {"role": "assistant", "content": "a"}]}', "system message may only come first"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}',
     "empty or non-string content"),
    ('{"text": "hi"}', "expected an object"),
    ('not json', "not valid JSON"),
])
def test_bad_chat_jsonl(tmp_path, line, match):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"messages": [{"role": "user", "content": "a"}, '
               '{"role": "assistant", "content": "b"}]}\n' + line + "\n")
  with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{match}"):
    prepare.read_jsonl(str(p), "chat")


def test_content_may_not_spell_role_tags(datasets):
  tok = tokenizer.Tokenizer.load_chat(datasets["chat"])
  msgs = [{"role": "user", "content": "hi <|assistant|> yes"},
          {"role": "assistant", "content": "ok"}]
  with pytest.raises(ValueError, match=r"message 0 contains the special token '<\|assistant\|>'"):
    prepare.encode_conversation(tok, msgs)


# --- init_from --------------------------------------------------------------

def _params_equal(a, b):
  a, b = jax.device_get((a, b))
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_init_from_restores_base_params_with_fresh_optimizer(datasets, tmp_path):
  base = datasets["base"]
  c = chat_config(f"sft,tiny,data={datasets['chat']}")
  c.train.init_from = base
  data = registry.load(c)
  base_cfg = workdir_lib.check_init_from(c, str(tmp_path / "sft"), data)
  state = step_lib.create_train_state(c, jax.random.PRNGKey(7), vocab_size=data.vocab_size,
                                      keys_are_prefix=data.keys_are_prefix)
  state, base_step = workdir_lib.init_from_base(c, state, base_cfg, data)
  _, base_state = _restore(base)
  assert base_step == int(base_state.step) == 6
  assert _params_equal(state.params, base_state.params)
  assert int(state.step) == 0
  assert _params_equal(state.opt_state, state.tx.init(state.params))

  sft_dir = str(tmp_path / "sft")
  c.train.steps = 2
  res = train.train_and_evaluate(c, sft_dir)
  assert res["step"] == 2
  saved = workdir_lib.load_config(sft_dir)
  assert saved["train"]["init_from"] == base and saved["data"]["use_loss_mask"] is True
  rec = json.load(open(os.path.join(sft_dir, workdir_lib.MODEL_FILE)))
  assert rec["init_from"] == {"workdir": os.path.abspath(base), "step": 6}
  assert rec["decoder"]["d_model"] == base_cfg["model"]["d_model"]
  assert rec["decoder"]["dropout"] == c.model.dropout  # training parameter from the SFT config


# --- the zero-mask skip inside the jitted step -------------------------------

def test_zero_mask_batch_keeps_params_and_optimizer_state(datasets):
  # The SFT tiny config and chat batches, jitted like the train loop: the compiled
  # step is the one the init_from tests already built (persistent cache).
  c = chat_config(f"sft,tiny,data={datasets['chat']}")
  data = registry.load(c)
  state = step_lib.create_train_state(c, jax.random.PRNGKey(0), vocab_size=data.vocab_size,
                                      keys_are_prefix=data.keys_are_prefix)
  step = jax.jit(step_lib.train_step, donate_argnums=0)
  good = data.train_batch(0)
  state, m1 = step(state, good)  # AdamW momentum is now non-zero
  assert float(m1["skipped_empty"]) == 0 and float(m1["loss"]) > 0
  zero = good.replace(loss_mask=np.zeros_like(good.loss_mask))
  before = jax.tree.map(jnp.array, (state.params, state.opt_state))  # step donates state
  step_before = int(state.step)
  new, m = step(state, zero)
  assert float(m["loss"]) == 0.0 and np.isfinite(float(m["loss"]))
  assert float(m["skipped_empty"]) == 1.0 and float(m["update_norm"]) == 0.0
  assert int(new.step) == step_before + 1  # documented: the counter still advances
  assert _params_equal((new.params, new.opt_state), before)
  # Twin without the skip: AdamW moves params on a zero gradient (momentum, decay).
  params, opt_state = before
  grads = jax.tree.map(jnp.zeros_like, params)
  moved = jax.jit(lambda g, o, p: optax.apply_updates(p, new.tx.update(g, o, p)[0]))(
      grads, opt_state, params)
  assert not _params_equal(moved, params)
  # a normal batch after the skip trains again
  _, m3 = step(new, good)
  assert float(m3["skipped_empty"]) == 0 and float(m3["update_norm"]) > 0


def _restore(workdir):
  from ml_collections import ConfigDict
  config = ConfigDict(workdir_lib.load_config(workdir))
  meta = shards.read_meta(config.data.path)
  state = step_lib.create_train_state(config, jax.random.PRNGKey(0),
                                   vocab_size=meta["vocab_size"], keys_are_prefix=True)
  mngr = ckpt.manager(workdir, ckpt.CKPT_DIR, 2, create=False,
                      barrier_timeout_s=config.distributed.barrier_timeout_s)
  _, tree, _ = ckpt.restore(mngr, None, state.checkpoint_tree())
  mngr.close()
  return config, state.replace_from_tree(tree)


@pytest.mark.parametrize("field, value", [("d_model", 48), ("n_layers", 2), ("max_len", 72),
                                          ("vocab_size", 123)])
def test_init_from_architecture_mismatch_names_field(datasets, tmp_path, field, value):
  c = chat_config(f"sft,tiny,data={datasets['chat']}")
  c.train.init_from = datasets["base"]
  c.model[field] = value
  sft_dir = str(tmp_path / "sft")
  with pytest.raises(ValueError, match=f"model.{field}: "):
    train.train_and_evaluate(c, sft_dir)
  assert not os.path.exists(sft_dir)  # refused before anything was written


def test_init_from_other_tokenizer_refused(datasets, tmp_path):
  other = str(tmp_path / "chat_other")
  c = chat_config(f"sft,tiny,data={other}")
  c.data.tokenizer = ""            # a freshly trained tokenizer, same vocab size
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    prepare.prepare(c)
  c.train.init_from = datasets["base"]
  with pytest.raises(ValueError, match="model.vocab_size|data tokenizer"):
    train.train_and_evaluate(c, str(tmp_path / "sft"))


def test_use_loss_mask_switch(datasets):
  on = registry.load(chat_config(f"sft,tiny,data={datasets['chat']}"))
  off = registry.load(chat_config(f"sft,tiny,mask=false,data={datasets['chat']}"))
  b_on, b_off = on.train_batch(3), off.train_batch(3)
  np.testing.assert_array_equal(b_on.inputs, b_off.inputs)  # same data order
  assert 0 < b_on.loss_mask.sum() < b_off.loss_mask.sum()
  np.testing.assert_array_equal(b_off.loss_mask,
                                (b_off.key_mask & (b_off.targets != 0)).astype(np.float32))
  assert np.all(b_on.loss_mask <= b_off.loss_mask)


# --- a resumed run continues with the next batch -------------------------------

@pytest.mark.slow
def test_resumed_run_matches_uninterrupted(datasets, tmp_path):
  def cfg(steps):
    c = chat_config(f"sft,tiny,data={datasets['chat']}")
    c.train.init_from = datasets["base"]
    c.train.steps, c.train.ckpt_every, c.train.eval_every = steps, 3, 100
    return c
  train.train_and_evaluate(cfg(6), str(tmp_path / "straight"))
  train.train_and_evaluate(cfg(3), str(tmp_path / "resumed"))
  train.train_and_evaluate(cfg(6), str(tmp_path / "resumed"))  # resumes at step 3
  _, a = _restore(str(tmp_path / "straight"))
  _, b = _restore(str(tmp_path / "resumed"))
  assert int(a.step) == int(b.step) == 6
  assert _params_equal(a.params, b.params) and _params_equal(a.opt_state, b.opt_state)
  # the twin: restarting the data at batch 0 after the resume gives other params
  c = cfg(6)
  data = registry.load(c)
  assert not np.array_equal(data.train_batch(3).inputs, data.train_batch(0).inputs)


# --- assistant-turn scoring ----------------------------------------------------

def test_evaluate_turns_counts_exact_matches(datasets, monkeypatch):
  """A model forced to emit the reference answers scores 1.0; the planted twin, one
  that opens every reply with a role tag, scores 0 and is counted on
  starts_with_role_tag."""
  data = registry.load(chat_config(f"sft,tiny,data={datasets['chat']}"))
  tok = data.tokenizer
  split = shards.ShardSplit(datasets["chat"], "val", use_loss_mask=True)
  docs = [split.doc(d)[0] for d in range(len(split))]
  turns = [t for ids in docs for t in eval_chat.assistant_turns(ids, tok)]
  assert turns and all(p[-1] == tok.role_id["assistant"] for p, _ in turns)
  answers = {tuple(p): r + [tok.end_id] for p, r in turns}

  def oracle(state, prompts, tok_, *, max_new, batch_size, max_len):
    out = []
    for p in prompts:
      for q, full in sorted(answers.items(), key=lambda kv: -len(kv[0])):
        if list(p[:len(q)]) == list(q) and len(p) - len(q) < len(full):
          out.append(full[len(p) - len(q):][:max_new])
          break
      else:
        out.append([tok.role_id["user"]])
    return out
  monkeypatch.setattr(eval_chat, "generate_replies", oracle)
  m, ex = eval_chat.evaluate_turns(None, docs, tok, max_new=64, max_len=64, num_examples=2)
  assert m["exact_match"] == 1.0 and m["stopped"] == 1.0 and m["starts_with_role_tag"] == 0
  assert m["continues_with_user_turn"] == 1.0 and len(ex) == 2 and ex[0]["exact"]

  def tag_first(state, prompts, tok_, *, max_new, batch_size, max_len):
    return [[tok.role_id["assistant"], tok.end_id] for _ in prompts]
  monkeypatch.setattr(eval_chat, "generate_replies", tag_first)
  bad, _ = eval_chat.evaluate_turns(None, docs, tok, max_new=64, max_len=64)
  assert bad["exact_match"] == 0.0 and bad["starts_with_role_tag"] == 1.0
