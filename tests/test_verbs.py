import pytest

from lmmask.data import verbs as V


def _texts(examples):
    return {e.text for e in examples}


def test_grid_counts():
    forms = V.all_forms()
    assert len(forms) == 300
    assert len(V.VERBS) == 20
    assert V.TENSES == ("present", "past", "going_to", "future", "progressive")
    assert V.PERSONS == ("1", "2", "3")
    assert len({e.verb for e in forms}) == 20
    assert {e.tense for e in forms} == set(V.TENSES)
    assert {e.person for e in forms} == set(V.PERSONS)
    assert len(_texts(forms)) == 300  # every cell is a distinct line
    assert all(e.kind == "form" for e in forms)
    assert len({v.es_inf for v in V.VERBS}) == 20


def test_verb_mix_and_flags():
    n_reg = sum(v.regular_en for v in V.VERBS)
    assert 10 <= n_reg <= 14 and 20 - n_reg >= 6
    by = {v.en_base: v for v in V.VERBS}
    assert by["look"].regular_en and by["like"].regular_en
    assert not by["see"].regular_en and not by["eat"].regular_en
    assert by["work"].es_inf == "trabajar" and by["eat"].es_inf == "comer"
    assert by["see"].es_inf == "ver" and by["look"].es_inf == "mirar"
    for v in V.VERBS:
        assert v.regular_es == (not v.es_irregular and v.es_gerund is None)
        assert v.regular_en == (v.en_past is None)


@pytest.mark.parametrize("text", [
    "yo trabajo / I work",
    "él trabaja / he work s",
    "él va a trabajar / he is going to work",
    "yo trabajé / I work ed",
    "yo trabajaré / I will work",
    "yo estoy trabajando / I am work ing",
    "tú estás trabajando / you are work ing",
    "tú vas a comer / you are going to eat",
    "yo comí / I ate",
    "él vio / he saw",
    "tú viste / you saw",
    "él come / he eat s",
    "yo fui / I went",
    "él está durmiendo / he is sleep ing",
    "tú quisiste / you like ed",
    "yo hago / I make",
])
def test_specific_forms(text):
    assert text in _texts(V.all_forms())


def test_irregular_past_is_whole_word():
    forms = {(e.verb, e.tense, e.person): e for e in V.all_forms()}
    for base, past in (("eat", "ate"), ("see", "saw")):
        for p in V.PERSONS:
            e = forms[(base, "past", p)]
            english = e.text.split(" / ")[1].split()
            assert english[1:] == [past] and "ed" not in english
            assert not e.regular


def test_regular_english():
    assert V.regular_english("eat", "past", "1") == "I eat ed"
    assert V.regular_english("see", "present", "3") == "he see s"
    assert V.regular_english("work", "going_to", "2") == "you are going to work"
    assert V.regular_english("blick", "progressive", "1") == "I am blick ing"
    forms = {(e.verb, e.tense, e.person): e.text.split(" / ")[1] for e in V.all_forms()}
    for (base, tense, person), english in forms.items():
        regular = V.regular_english(base, tense, person)
        differs = english != regular
        assert differs == (tense == "past" and not V._BY_EN[base].regular_en)
    with pytest.raises(ValueError):
        V.regular_english("work", "pluperfect", "1")


@pytest.mark.parametrize("split,n_train,n_val", [
    ("verbs", 240, 60), ("tense", 240, 60), ("person", 200, 100)])
def test_split_counts(split, n_train, n_val):
    c = V.build_corpus(split, include_lexicon=False)
    assert (len(c.train), len(c.val), c.split) == (n_train, n_val, split)
    c = V.build_corpus(split)
    assert (len(c.train), len(c.val)) == (n_train + 20, n_val)
    assert sum(e.kind == "lexicon" for e in c.train) == 20
    assert all(e.kind == "form" for e in c.val)
    train_forms = _texts(e for e in c.train if e.kind == "form")
    assert not train_forms & _texts(c.val)
    assert train_forms | _texts(c.val) == _texts(V.all_forms())


def test_default_split_holds_out_verbs():
    c = V.build_corpus()
    assert c.split == "verbs"
    held = set(V.HELD_OUT_VERBS)
    assert {e.verb for e in c.val} == held
    assert not {e.verb for e in c.train if e.kind == "form"} & held
    lex = {e.verb: e for e in c.train if e.kind == "lexicon"}
    assert held <= set(lex) and len(lex) == 20
    assert lex["look"].text == "mirar / look"
    assert {e.regular for e in c.val} == {True, False}


def test_tense_and_person_splits():
    c = V.build_corpus("tense")
    assert {e.tense for e in c.val} == {"future"}
    assert "future" not in {e.tense for e in c.train}
    c = V.build_corpus("person")
    assert {e.person for e in c.val} == {"2"}
    assert "2" not in {e.person for e in c.train}
    c = V.build_corpus("tense", held_out_tense="past")
    assert {e.tense for e in c.val} == {"past"}


def test_random_split_refused():
    for name in ("random", "random_80_20"):
        with pytest.raises(ValueError) as info:
            V.build_corpus(name)
        msg = str(info.value)
        assert "random" in msg and "interpolate" in msg
        for policy in V.SPLIT_POLICIES:
            assert policy in msg


def test_bad_arguments():
    with pytest.raises(ValueError) as info:
        V.build_corpus("bogus")
    assert all(p in str(info.value) for p in V.SPLIT_POLICIES)
    with pytest.raises(ValueError):
        V.build_corpus("verbs", held_out_verbs=("fly",))
    with pytest.raises(ValueError):
        V.build_corpus("tense", held_out_tense="pluperfect")
    with pytest.raises(ValueError):
        V.build_corpus("person", held_out_person="4")


def test_sequence_structure_and_lengths():
    vocab = V.build_vocab()
    examples = V.all_forms() + V.lexicon()
    for e in examples:
        assert 5 <= len(e.ids) <= 14, e.text
        assert e.ids[0] == vocab.bos_id and e.ids[-1] == vocab.eos_id
        assert e.ids.count(vocab.sep_id) == 1
        assert e.ids[e.english_start - 1] == vocab.sep_id
        assert vocab.decode(e.ids[e.english_start:]) == e.text.split(" / ")[1]
    lex = V.lexicon()
    assert len(lex) == 20 and all(len(e.ids) == 5 for e in lex)
    assert all(e.tense is None and e.person is None for e in lex)


def test_vocab():
    vocab = V.build_vocab()
    assert vocab.tokens[:3] == (V.PAD, V.BOS, V.EOS)
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2)
    assert vocab.id("/") == vocab.sep_id
    assert list(vocab.tokens[3:]) == sorted(vocab.tokens[3:])
    assert "<unk>" not in vocab.tokens
    assert len(vocab) == len(set(vocab.tokens))
    used = {w for e in V.all_forms() + V.lexicon() for w in e.text.split()}
    assert used == set(vocab.tokens[3:])


def test_encode_decode_roundtrip():
    vocab = V.build_vocab()
    for e in V.all_forms() + V.lexicon():
        assert vocab.encode(e.text) == list(e.ids)
        assert vocab.decode(e.ids) == e.text
        assert vocab.encode(e.text, add_bos=False, add_eos=False) == list(e.ids[1:-1])
    ids = vocab.encode("yo trabajo / I work") + [vocab.pad_id] * 3
    assert vocab.decode(ids) == "yo trabajo / I work"
    assert vocab.decode(ids, strip_special=False).split()[0] == V.BOS
    with pytest.raises(ValueError, match="zzz"):
        vocab.encode("yo zzz / I work")


def test_deterministic():
    for split in V.SPLIT_POLICIES:
        assert V.build_corpus(split) == V.build_corpus(split)
    assert V.all_forms() == V.all_forms()
    assert V.Vocab.from_texts(["b a", "a"]) == V.Vocab.from_texts(["a", "a b"])
