"""Spanish/English verb-grammar corpus, generated entirely by code.

Grid: 20 verbs x 5 tenses x 3 persons = 300 conjugated forms.  Each form is a
line ``"<spanish> / <english>"``, e.g. ``"él va a trabajar / he is going to work"``.

Tenses (fixed order): ``present``, ``past`` (Spanish preterite), ``going_to``
(periphrastic future, ``voy a + inf`` / ``am going to + base``), ``future``
(simple future, ``-é`` / ``will + base``) and ``progressive``
(``estoy + gerund`` / ``am + base ing``).  Persons: ``"1"`` yo/I,
``"2"`` tú/you, ``"3"`` él/he.

English segmentation rule (morphemic, not orthographic):

* The suffixes ``s`` (3rd-person present), ``ed`` (past) and ``ing``
  (progressive) are separate tokens appended to the *unchanged* base, so
  spelling adjustments are ignored: ``"he like s"``, ``"I like ed"``,
  ``"I am make ing"``.
* For every verb in this set ``s`` and ``ing`` are morphologically regular, so
  they are always segmented.  The only English irregularity is the past tense:
  irregular verbs use a single whole-word past form (``"I ate"``, ``"he saw"``).
  ``regular_en`` is False exactly for those verbs.  Verbs with an irregular
  3rd-person present (be, have) are deliberately excluded.

``regular_es`` is True iff all five Spanish tenses (and the gerund) follow the
standard -ar/-er/-ir paradigm with no stem or spelling change.  The two flags
differ on purpose for some verbs (comer/eat is regular in Spanish only,
querer/like in English only).  "like" is paired with ``querer`` because
``gustar`` does not take yo/tú/él as subject; ``querer`` conjugates naturally.

Two tokenizations of the same lines (``tokens``), both with ``<pad>=0, <bos>=1,
<eos>=2`` and each sequence ``[<bos>, spanish..., separator, english..., <eos>]``:

* ``"word"``: whitespace tokens; the separator is ``"/"``.  A held-out verb's
  conjugated forms ("miro") are then tokens that never occur in training, so
  their embeddings stay at their initial values and the model cannot conjugate
  a verb it never saw, whatever rule it learned.
* ``"char"``: every character (the space included) is a token, and the
  separator ``" / "`` stays one token so the Spanish/English boundary is as
  explicit as at word level.  Held-out forms are then new strings over known
  tokens, which is what makes rule learning measurable.

The vocabulary is closed over all forms and the 20 lexicon lines
(``"trabajar / work"``), so no ``<unk>`` exists.  Splits always hold out whole
dimensions (verbs, a tense or a person); a random split is refused.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Sequence

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SEP = "/"
CHAR_SEP = f" {SEP} "  # at character level the separator with its spaces is one token
TOKENIZATIONS = ("word", "char")
TENSES = ("present", "past", "going_to", "future", "progressive")
PERSONS = ("1", "2", "3")
SPLIT_POLICIES = ("verbs", "tense", "person")
HELD_OUT_VERBS = ("look", "like", "see", "eat")  # English bases

_ES_PRONOUN = {"1": "yo", "2": "tú", "3": "él"}
_EN_PRONOUN = {"1": "I", "2": "you", "3": "he"}
_ES_ESTAR = {"1": "estoy", "2": "estás", "3": "está"}
_ES_IR = {"1": "voy", "2": "vas", "3": "va"}
_EN_BE = {"1": "am", "2": "are", "3": "is"}
_ES_SPANISH_TENSES = ("present", "past", "future")


@dataclasses.dataclass(frozen=True)
class Verb:
    es_inf: str
    en_base: str
    regular_en: bool
    regular_es: bool
    en_past: str | None = None  # whole-word past for irregular English verbs
    es_irregular: tuple[tuple[str, tuple[str, str, str]], ...] = ()  # (tense, forms)
    es_gerund: str | None = None  # irregular Spanish gerund

    def es_forms(self, tense: str) -> tuple[str, str, str]:
        """Synthetic Spanish forms (yo, tú, él) for present/past/future."""
        override = dict(self.es_irregular).get(tense)
        return override if override is not None else _regular_es(self.es_inf, tense)

    def gerund(self) -> str:
        if self.es_gerund is not None:
            return self.es_gerund
        stem, cls = self.es_inf[:-2], self.es_inf[-2:]
        return stem + ("ando" if cls == "ar" else "iendo")


def _regular_es(inf: str, tense: str) -> tuple[str, str, str]:
    stem, cls = inf[:-2], inf[-2:]
    if tense == "present":
        ends = ("o", "as", "a") if cls == "ar" else ("o", "es", "e")
    elif tense == "past":
        ends = ("é", "aste", "ó") if cls == "ar" else ("í", "iste", "ió")
    elif tense == "future":
        return (inf + "é", inf + "ás", inf + "á")
    else:
        raise ValueError(f"no synthetic Spanish form for tense {tense!r}")
    return tuple(stem + e for e in ends)  # type: ignore[return-value]


def _verb(es: str, en: str, en_past: str | None = None, gerund: str | None = None,
          **irregular: tuple[str, str, str]) -> Verb:
    assert set(irregular) <= set(_ES_SPANISH_TENSES), irregular
    irr = tuple((t, irregular[t]) for t in _ES_SPANISH_TENSES if t in irregular)
    return Verb(es_inf=es, en_base=en, regular_en=en_past is None,
                regular_es=not irr and gerund is None, en_past=en_past,
                es_irregular=irr, es_gerund=gerund)


VERBS: tuple[Verb, ...] = (
    # 12 verbs regular in English
    _verb("trabajar", "work"),
    _verb("mirar", "look"),
    _verb("querer", "like", present=("quiero", "quieres", "quiere"),
          past=("quise", "quisiste", "quiso"), future=("querré", "querrás", "querrá")),
    _verb("caminar", "walk"),
    _verb("hablar", "talk"),
    _verb("jugar", "play", present=("juego", "juegas", "juega"),
          past=("jugué", "jugaste", "jugó")),
    _verb("cocinar", "cook"),
    _verb("bailar", "dance"),
    _verb("llamar", "call"),
    _verb("ayudar", "help"),
    _verb("escuchar", "listen"),
    _verb("aprender", "learn"),
    # 8 verbs irregular in English (past tense)
    _verb("ver", "see", "saw", present=("veo", "ves", "ve"), past=("vi", "viste", "vio")),
    _verb("comer", "eat", "ate"),
    _verb("ir", "go", "went", gerund="yendo", present=("voy", "vas", "va"),
          past=("fui", "fuiste", "fue")),
    _verb("hacer", "make", "made", present=("hago", "haces", "hace"),
          past=("hice", "hiciste", "hizo"), future=("haré", "harás", "hará")),
    _verb("escribir", "write", "wrote"),
    _verb("beber", "drink", "drank"),
    _verb("venir", "come", "came", gerund="viniendo", present=("vengo", "vienes", "viene"),
          past=("vine", "viniste", "vino"), future=("vendré", "vendrás", "vendrá")),
    _verb("dormir", "sleep", "slept", gerund="durmiendo",
          present=("duermo", "duermes", "duerme"), past=("dormí", "dormiste", "durmió")),
)
_BY_EN = {v.en_base: v for v in VERBS}


def _check(tense: str, person: str) -> None:
    if tense not in TENSES:
        raise ValueError(f"unknown tense {tense!r}; expected one of {TENSES}")
    if person not in PERSONS:
        raise ValueError(f"unknown person {person!r}; expected one of {PERSONS}")


def spanish_form(verb: Verb, tense: str, person: str) -> str:
    _check(tense, person)
    p = int(person) - 1
    if tense == "going_to":
        words = [_ES_IR[person], "a", verb.es_inf]
    elif tense == "progressive":
        words = [_ES_ESTAR[person], verb.gerund()]
    else:
        words = [verb.es_forms(tense)[p]]
    return " ".join([_ES_PRONOUN[person], *words])


def regular_english(verb_base: str, tense: str, person: str) -> str:
    """English form built by the regular rule, for any base (known or not).

    For irregular verbs this yields the over-regularised answer, e.g.
    ``regular_english("eat", "past", "1") == "I eat ed"``.
    """
    _check(tense, person)
    words = {
        "present": [verb_base, "s"] if person == "3" else [verb_base],
        "past": [verb_base, "ed"],
        "going_to": [_EN_BE[person], "going", "to", verb_base],
        "future": ["will", verb_base],
        "progressive": [_EN_BE[person], verb_base, "ing"],
    }[tense]
    return " ".join([_EN_PRONOUN[person], *words])


def english_form(verb: Verb, tense: str, person: str) -> str:
    if tense == "past" and verb.en_past is not None:
        _check(tense, person)
        return f"{_EN_PRONOUN[person]} {verb.en_past}"
    return regular_english(verb.en_base, tense, person)


def check_tokens(tokens: str, corpus: str = "verbs") -> None:
    """Refuse a tokenization the corpus does not have, saying what to set instead."""
    if tokens not in TOKENIZATIONS:
        raise ValueError(f"config.data.tokens: unknown tokenization {tokens!r}; valid: "
                         f"{', '.join(TOKENIZATIONS)}")
    if tokens != "word" and corpus != "verbs":
        raise ValueError(f"config.data.tokens={tokens!r} is the verbs corpus's character "
                         f"tokenizer; corpus {corpus!r} brings its own tokenizer, so set "
                         f"data.tokens='word' (or leave it out)")


def char_units(text: str) -> list[str]:
    """Character tokens of a line: every character, with ``" / "`` kept whole."""
    parts = text.split(CHAR_SEP)
    units = list(parts[0])
    for part in parts[1:]:
        units += [CHAR_SEP, *part]
    return units


def frame_match(completion: str, verb_base: str, tense: str, person: str) -> bool:
    """True when `completion` is the reference English form with any word as the verb.

    Separates the conjugation rule from the lexicon: "you will walk" for "you will
    look" has the tense and person right and only the verb wrong.
    """
    verb = _BY_EN[verb_base]
    ref = english_form(verb, tense, person).split()
    slot = next(i for i, w in enumerate(ref) if w in (verb.en_base, verb.en_past))
    out = completion.split()
    return len(out) == len(ref) and all(a == b for i, (a, b) in enumerate(zip(out, ref))
                                        if i != slot)


@dataclasses.dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]
    kind: str = "word"  # one of TOKENIZATIONS: how text is cut into tokens
    _index: dict = dataclasses.field(init=False, repr=False, compare=False)
    pad_id: int = dataclasses.field(default=0, init=False)
    bos_id: int = dataclasses.field(default=1, init=False)
    eos_id: int = dataclasses.field(default=2, init=False)

    def __post_init__(self) -> None:
        if tuple(self.tokens[:3]) != (PAD, BOS, EOS):
            raise ValueError("vocab must start with <pad>, <bos>, <eos>")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("duplicate tokens in vocab")
        check_tokens(self.kind)
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def from_texts(cls, texts: Iterable[str], kind: str = "word") -> Vocab:
        check_tokens(kind)
        split = str.split if kind == "word" else char_units
        units = {u for t in texts for u in split(t)} - {PAD, BOS, EOS}
        return cls((PAD, BOS, EOS, *sorted(units)), kind=kind)

    @property
    def sep(self) -> str:
        return SEP if self.kind == "word" else CHAR_SEP

    @property
    def sep_id(self) -> int:
        return self.id(self.sep)

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        try:
            return self._index[token]
        except KeyError:
            raise ValueError(f"unknown token {token!r} (not in the {self.kind}-level "
                             f"vocabulary)") from None

    def units(self, text: str) -> list[str]:
        """The token strings of `text` (no specials added)."""
        return text.split() if self.kind == "word" else char_units(text)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = [self.id(w) for w in self.units(text)]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_prompt(self, text: str) -> list[int]:
        """``<bos>`` + `text`, for generation. A trailing ``"/"`` (as in "yo como /")
        becomes the separator token, so one prompt works for both tokenizations."""
        words = [w for w in text.split() if w != BOS]
        if not words:
            raise ValueError(f"prompt {text!r} is empty; give at least one word, e.g. "
                             f"'yo como /'")
        tail = [self.sep_id] if words[-1] == SEP else []
        body = " ".join(words[:-1] if tail else words)
        try:
            ids = self.encode(body, add_bos=False, add_eos=False) if body else []
        except ValueError as e:
            raise ValueError(f"prompt {text!r}: {e}; use words (word tokens) or letters "
                             f"(char tokens) of the verbs corpus") from None
        return [self.bos_id] + ids + tail

    def decode(self, ids: Sequence[int], strip_special: bool = True) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        return (" " if self.kind == "word" else "").join(
            self.tokens[int(i)] for i in ids if not (strip_special and int(i) in special))


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    ids: tuple[int, ...]
    verb: str
    tense: str | None
    person: str | None
    regular: bool
    kind: str  # "form" or "lexicon"
    english_start: int


@dataclasses.dataclass(frozen=True)
class VerbCorpus:
    vocab: Vocab
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    split: str


def _form_rows() -> list[tuple[str, Verb, str, str]]:
    return [(f"{spanish_form(v, t, p)} {SEP} {english_form(v, t, p)}", v, t, p)
            for v in VERBS for t in TENSES for p in PERSONS]


def _lexicon_rows() -> list[tuple[str, Verb]]:
    return [(f"{v.es_inf} {SEP} {v.en_base}", v) for v in VERBS]


@functools.lru_cache(maxsize=None)
def build_vocab(tokens: str = "word") -> Vocab:
    """Vocabulary closed over every form and lexicon line (sorted, deterministic)."""
    texts = [r[0] for r in _form_rows()] + [r[0] for r in _lexicon_rows()]
    return Vocab.from_texts(texts + ([SEP] if tokens == "word" else []), kind=tokens)


def _example(vocab: Vocab, text: str, verb: Verb, tense: str | None,
             person: str | None, kind: str) -> Example:
    ids = tuple(vocab.encode(text))
    return Example(text=text, ids=ids, verb=verb.en_base, tense=tense, person=person,
                   regular=verb.regular_en, kind=kind,
                   english_start=ids.index(vocab.sep_id) + 1)


def all_forms(tokens: str = "word") -> list[Example]:
    """The 300 conjugated forms, ordered verb-major, then tense, then person."""
    vocab = build_vocab(tokens)
    return [_example(vocab, text, v, t, p, "form") for text, v, t, p in _form_rows()]


def lexicon(tokens: str = "word") -> list[Example]:
    """One infinitive pair per verb, e.g. ``"trabajar / work"``."""
    vocab = build_vocab(tokens)
    return [_example(vocab, text, v, None, None, "lexicon") for text, v in _lexicon_rows()]


def build_corpus(split: str = "verbs", *, include_lexicon: bool = True,
                 held_out_verbs: Sequence[str] = HELD_OUT_VERBS,
                 held_out_tense: str = "future", held_out_person: str = "2",
                 tokens: str = "word") -> VerbCorpus:
    """Split the 300 forms by holding out an entire dimension.

    ``verbs``: hold out ``held_out_verbs`` (English bases); ``tense``: hold out
    ``held_out_tense``; ``person``: hold out ``held_out_person``.  With
    ``include_lexicon`` the 20 lexicon lines (all verbs, held-out ones too) are
    appended to train; val never contains lexicon lines.  ``tokens`` ("word" or
    "char") picks the tokenization; the split is the same lines either way.
    """
    check_tokens(tokens)
    if not isinstance(split, str):
        raise ValueError(f"split must be a string, one of {SPLIT_POLICIES}")
    if "random" in split.lower():
        raise ValueError(
            f"split {split!r} refused: a random split scatters held-out forms among "
            "their neighbours, so a ~100k-parameter model can interpolate nearby "
            "(verb, tense, person) cells instead of learning the conjugation rule. "
            f"Hold out a whole dimension instead; allowed policies: {SPLIT_POLICIES}")
    if split not in SPLIT_POLICIES:
        raise ValueError(f"unknown split {split!r}; valid policies: {SPLIT_POLICIES}")
    forms = all_forms(tokens)
    if split == "verbs":
        held = tuple(held_out_verbs)
        unknown = [h for h in held if h not in _BY_EN]
        if unknown or not held:
            raise ValueError(f"held_out_verbs must be non-empty English bases from "
                             f"{tuple(_BY_EN)}; unknown: {unknown}")
        is_val = lambda e: e.verb in held  # noqa: E731
    elif split == "tense":
        _check(held_out_tense, PERSONS[0])
        is_val = lambda e: e.tense == held_out_tense  # noqa: E731
    else:
        _check(TENSES[0], held_out_person)
        is_val = lambda e: e.person == held_out_person  # noqa: E731
    train = [e for e in forms if not is_val(e)]
    val = [e for e in forms if is_val(e)]
    if include_lexicon:
        train += lexicon(tokens)
    return VerbCorpus(vocab=build_vocab(tokens), train=tuple(train), val=tuple(val),
                      split=split)


def fit_lengths(tokens: str) -> dict:
    """The smallest sizes that fit every line of the corpus at this tokenization.

    ``data.length``: the longest sequence, ``<bos>`` and ``<eos>`` included.
    ``eval.max_new_tokens``: the longest reply (either side, so both exact-match
    directions fit) plus ``<eos>``; a budget shorter than that scores the longest
    references wrong before the model is asked anything.
    ``model.max_len``: positions for the model input (``data.length - 1``) and
    for the longest prompt (``<bos>`` side separator) plus that budget.
    """
    vocab = build_vocab(tokens)
    rows = [r[0] for r in _form_rows()] + [r[0] for r in _lexicon_rows()]
    sides = [r.split(CHAR_SEP) for r in rows]
    length = max(len(vocab.encode(r)) for r in rows)
    reply = max(len(vocab.units(side)) for pair in sides for side in pair) + 1
    prompt = max(len(vocab.units(side)) for pair in sides for side in pair) + 2
    return {"data.length": length, "eval.max_new_tokens": reply,
            "model.max_len": max(length - 1, prompt + reply - 1)}
