"""Chat templates, SFT masks and the pad id, without torch or transformers."""
import pytest

from lmmask.data import chat_template, hf_tokenizer, prepare

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["hello there, how are you?", "fine thanks. and you?", "the cat sat on the mat",
         "numbers 1 2 3 and symbols {} [] <>"]
CONV = [{"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi, how are you?"},
        {"role": "user", "content": "fine"}, {"role": "assistant", "content": "good to hear"}]


def chatml_tokenizer(template=CHATML, pad="<|im_end|>", specials=("<|endoftext|>", "<|im_start|>",
                                                                   "<|im_end|>")):
  import tokenizers as tk
  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tk.decoders.ByteLevel()
  tok.train_from_iterator(TEXTS, tk.trainers.BpeTrainer(
      vocab_size=300, special_tokens=list(specials), show_progress=False,
      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
  special = {"bos_token": None, "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
             "pad_token": pad}
  return hf_tokenizer.HFTokenizer(
      tok=tok, special_tokens=special, chat_template=template,
      pad_id=hf_tokenizer.choose_pad_id(tok, special, template))


def test_lmmask_template_gives_encode_conversation_ids_and_mask():
  chat_tok = prepare.train_tokenizer(TEXTS * 3, vocab_size=300)
  tok = hf_tokenizer.from_chat_tokenizer(chat_tok)
  msgs = [{"role": "system", "content": "be nice"}, *CONV]
  want_ids, want_mask = prepare.encode_conversation(chat_tok, msgs)
  ids, mask = chat_template.encode_chat(tok, msgs)
  assert ids == want_ids and mask == want_mask
  assert tok.pad_id == chat_tok.pad_id
  assert chat_template.end_of_turn_id(tok) == chat_tok.end_id
  prompt, _ = chat_template.encode_chat(tok, msgs[:2], add_generation_prompt=True)
  assert prompt == want_ids[:len(prompt)] and prompt[-1] == chat_tok.role_id["assistant"]


def test_chatml_masks_content_and_end_of_turn_only():
  tok = chatml_tokenizer()
  ids, mask = tok.encode_chat(CONV)
  assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.")
  runs, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(i)
    elif cur:
      runs.append(cur)
      cur = []
  texts = [tok.decode(r, skip_special_tokens=False) for r in runs + ([cur] if cur else [])]
  assert texts == ["hi, how are you?<|im_end|>", "good to hear<|im_end|>"]


def test_pad_avoids_eos_and_template_tokens():
  tok = chatml_tokenizer()
  assert tok.pad_token == "<|endoftext|>" and tok.pad_id == 0  # declared pad = eos
  with pytest.raises(ValueError, match="occurs in real data"):
    hf_tokenizer.choose_pad_id(tok.tok, tok.special_tokens, CHATML, pad_token="<|im_start|>")
  with pytest.raises(ValueError, match="data.pad_token"):  # every special token is used
    chatml_tokenizer(specials=("<|im_start|>", "<|im_end|>"), pad="<|im_end|>")


def test_refusals():
  tok = chatml_tokenizer()
  with pytest.raises(ValueError, match="special token '<|im_end|>'"):
    tok.encode_chat([{"role": "user", "content": "a<|im_end|>b"},
                     {"role": "assistant", "content": "x"}])
  with pytest.raises(ValueError, match="all-zero mask"):
    tok.encode_chat([{"role": "user", "content": "hello"}])
  # A template that drops earlier assistant turns (as reasoning templates do).
  rewriting = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
               "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
  with pytest.raises(ValueError, match="message 1 .assistant.*not a prefix"):
    chat_template.encode_chat(tok, CONV, template=rewriting)
  no_end = CHATML.replace("'<|im_end|>' + '\n'", "'\n'")
  with pytest.raises(ValueError, match="no special end-of-turn"):
    chat_template.encode_chat(tok, CONV, template=no_end)


def test_transformers_template_features():
  t = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
       "{% endif %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}"
       "{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}{{ strftime_now('%Y')[:0] }}")
  msgs = [{"role": "user", "content": "<a&b>"}, {"role": "user", "content": "x"},
          {"role": "user", "content": "y"}]
  assert chat_template.render(t, msgs, add_generation_prompt=False) == '"<a&b>""x"'
  import jinja2
  with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
    chat_template.render(t, [{"role": "tool", "content": ""}], add_generation_prompt=False)


def test_unset_special_tokens_and_tools_render_as_transformers():
  t = "{{ bos_token }}{% if tools is not none %}T{% endif %}{{ messages[0]['content'] }}"
  msgs = [{"role": "user", "content": "x"}]
  assert chat_template.render(t, msgs, add_generation_prompt=False,
                              special_tokens={"bos_token": None}) == "x"
  assert chat_template.render(t, msgs, add_generation_prompt=False,
                              special_tokens={"bos_token": "<s>"}) == "<s>x"
