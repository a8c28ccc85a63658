"""launch.py --mode=import / generate --chat / export / SFT from a chat JSONL, on a
tiny random Llama saved with transformers (as tests/test_hf.py builds it)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from test_chat_template import CONV
from test_hf import _hf_config, _randomise, _tokenizer_files

from lmmask import workdir as workdir_lib
from lmmask.data import registry
from lmmask.eval import chat as eval_chat
from lmmask.interop import convert as interop
from lmmask.interop import hf

pytestmark = pytest.mark.slow  # launch.py subprocesses (about a minute in all)
# The reference implementation. Both come with the test extra (pip install -e ".[test]",
# as CI does), so these tests run in CI; only an install without them skips them.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

PROMPT = "hello there"
SFT = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a + b}"}]}
       for a in range(4) for b in range(3)]


def launch(*args, check=True):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *args],
                     capture_output=True, text=True, env=env, timeout=600)
  if check and r.returncode != 0:
    raise AssertionError(f"launch.py {' '.join(args)} failed:\n{r.stdout}\n{r.stderr[-3000:]}")
  return r


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(HF directory, transformers model) of a tiny random Llama with a ChatML template."""
  d = str(tmp_path_factory.mktemp("llama_src"))
  vocab = _tokenizer_files(d)
  ref = _randomise(transformers.AutoModelForCausalLM.from_config(_hf_config("llama", vocab)), 0)
  ref.save_pretrained(d)
  return d, ref


@pytest.fixture(scope="module")
def imported(llama, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("imp") / "w")
  r = launch("--mode=import", f"--source={llama[0]}", f"--workdir={workdir}")
  assert "imported" in r.stdout and "llama" in r.stdout
  return workdir


def test_import_writes_a_workdir(imported, llama):
  for f in ("config.json", "model.json", "provenance.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"):
    assert os.path.exists(os.path.join(imported, f)), f
  model = json.load(open(os.path.join(imported, "model.json")))
  assert model["family"] == "llama" and model["source_config"]["model_type"] == "llama"
  prov = json.load(open(os.path.join(imported, "provenance.json")))["imported_from"]
  assert prov["path"] == os.path.abspath(llama[0]) and len(prov["sha256"]) == 64
  config, data, state, step = workdir_lib.restore_state(imported)
  assert step == 0 and config.data.corpus == "pretrained"
  # The pad chosen at import (pad = eos = <|im_end|> ends every turn): recorded everywhere.
  assert data.pad_id == data.tokenizer.pad_id == data.tokenizer.tok.token_to_id("<|endoftext|>")
  assert config.data.pad_token == "<|endoftext|>" and model["data"]["pad_id"] == data.pad_id
  # Same tree as training writes: a fresh AdamW state next to the imported params.
  assert state.opt_state is not None and int(state.step) == 0


def test_chat_generation_equals_transformers_greedy(imported, llama):
  ref = llama[1]
  r = launch("--mode=generate", f"--workdir={imported}", "--chat", f"--prompt={PROMPT}",
             "--max_new_tokens=12")
  reply = r.stdout.strip().split(" -> ", 1)[1]
  tok = transformers.AutoTokenizer.from_pretrained(llama[0])
  ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                add_generation_prompt=True, return_dict=False)
  with torch.no_grad():
    out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                       eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=0)[0, len(ids):]
  want = tok.decode(out, skip_special_tokens=True)
  if tok.convert_tokens_to_ids("<|im_end|>") not in out.tolist():
    want += "  [no end token within 12 tokens]"
  assert reply == want


def test_export_roundtrip_logits_equal(imported, llama, tmp_path):
  out = str(tmp_path / "hf_out")
  r = launch("--mode=export", f"--workdir={imported}", f"--out={out}")
  assert "llama" in r.stdout
  got = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.pad_token == "<|endoftext|>" and tok.chat_template
  ids = torch.tensor([tok("the cat sat on the mat")["input_ids"]])
  with torch.no_grad():
    a, b = got(ids).logits.numpy(), llama[1](ids).logits.numpy()
  assert np.abs(a - b).max() < 1e-4
  again = launch("--mode=export", f"--workdir={imported}", f"--out={out}", check=False)
  assert again.returncode != 0 and "already exists" in again.stderr


def test_import_refuses_existing_workdir(imported, llama):
  r = launch("--mode=import", f"--source={llama[0]}", f"--workdir={imported}", check=False)
  assert r.returncode != 0 and "already exists" in r.stderr


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("chats") / "chats.jsonl")
  with open(path, "w") as f:
    for rec in SFT:
      f.write(json.dumps(rec) + "\n")
  return path


def _sft_args(base, chats, workdir, *extra):
  return ["--config=configs/chat.py:sft,tiny", f"--config.train.init_from={base}",
          f"--config.data.path={chats}", f"--workdir={workdir}", "--config.train.steps=2",
          "--config.train.eval_every=2", "--config.train.ckpt_every=2",
          "--config.train.progress_bar=false", "--config.data.batch_size=4",
          "--config.eval.max_new_tokens=4", *extra]


def test_sft_from_imported_then_eval_audit_export(imported, chats, tmp_path):
  w = str(tmp_path / "sft")
  r = launch(*_sft_args(imported, chats, w))
  assert "initialised from" in r.stdout
  config = workdir_lib.load_config(w)
  base = workdir_lib.load_config(imported)
  assert config.model.to_dict() | {"dropout": 0.0} == base.model.to_dict() | {"dropout": 0.0}
  data = registry.load(config, w)
  assert data.tokenizer.pad_token == "<|endoftext|>"
  # The SFT masks are the assistant turns (content + <|im_end|>), from the template.
  toks, mask = data.documents("train").doc(0)
  text = data.tokenizer.decode(toks[mask.astype(bool)], skip_special_tokens=False)
  assert text.endswith("<|im_end|>") and "plus" not in text
  for mode in ("eval", "audit"):
    r = launch(f"--mode={mode}", f"--workdir={imported}", "--config=configs/chat.py:sft,tiny",
               f"--config.data.path={chats}", "--config.eval.max_new_tokens=4")
    assert ("assistant replies" if mode == "eval" else "no leak found") in r.stdout
    bare = launch(f"--mode={mode}", f"--workdir={imported}", check=False)
    assert bare.returncode != 0 and "--config.data.path=FILE.jsonl" in bare.stderr
  out = str(tmp_path / "sft_hf")
  launch("--mode=export", f"--workdir={w}", f"--out={out}", "--export_dtype=bfloat16")
  assert json.load(open(os.path.join(out, "config.json")))["architectures"] == \
      ["LlamaForCausalLM"]


def test_sft_refuses_architecture_override(imported, chats, tmp_path):
  w = str(tmp_path / "bad")
  r = launch(*_sft_args(imported, chats, w, "--config.model.d_ff=128"), check=False)
  assert r.returncode != 0 and "model.d_ff" in r.stderr


@pytest.mark.parametrize("line,error", [
    ({"messages": [{"role": "user", "content": "no answer"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "bye<|im_end|>"}]}, "special token"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "has role 'robot'"),
    ("not json", "not valid JSON")])
def test_chat_jsonl_refuses_bad_lines(imported, tmp_path, line, error):
  config = workdir_lib.load_config(imported)
  path = str(tmp_path / "bad.jsonl")
  with open(path, "w") as f:
    f.write(json.dumps(SFT[0]) + "\n")
    f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  with config.unlocked():
    config.data.corpus, config.data.path = "shards", path
  with pytest.raises(ValueError, match="tokenizer.json"):  # no base to take it from
    registry.load(config, str(tmp_path / "w"))
  config.train.init_from = imported
  with pytest.raises(ValueError, match=r"bad.jsonl:2: .*" + error):
    registry.load(config, str(tmp_path / "w"))


def test_chat_format_of_a_pretrained_template(imported):
  """Turns are the SFT mask's runs; the user-turn opener is the template's."""
  tok = registry.load(workdir_lib.load_config(imported), imported).tokenizer
  fmt = eval_chat.chat_format(tok)
  assert fmt.end_id == tok.tok.token_to_id("<|im_end|>") and not fmt.role_tags
  assert tok.decode(fmt.user_opener, skip_special_tokens=False) == "\n<|im_start|>user\n"
  ids, mask = tok.encode_chat(CONV)
  turns = eval_chat.mask_turns(ids, mask, fmt.end_id)
  assert [tok.decode(r) for _, r in turns] == ["hi, how are you?", "good to hear"]
  assert tok.decode(turns[1][0], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_family_of_refuses_native_option(tmp_path):
  cfg = hf.DecoderConfig(vocab_size=16, dropout=0.0, pos_encoding="rope", norm="layernorm",
                         attention="einsum")
  with pytest.raises(ValueError, match="DecoderConfig.norm"):
    hf.family_of(cfg)
  assert interop.export_tokenizer(None) is None
