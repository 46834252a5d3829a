"""The reference tokenizer: a fixed word-level vocabulary, one digit per token tagged by its place in
its number, lossless decoding."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfusion.errors import InvalidInput, NotFound
from memfusion.models.tokenizer import (
    DELIMITERS,
    DIGIT_PLACES,
    DIGITS,
    FACTS_BEGIN,
    FACTS_END,
    PUNCTUATION,
    VALUE_DELIMITER,
    WORDS,
    build_tokenizer,
    digit_tag,
    format_fact,
    format_facts,
    format_question,
    load_tokenizer,
    save_tokenizer,
    vocabulary,
)


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return build_tokenizer()


def pieces(tok, text: str) -> list[str]:  # type: ignore[no-untyped-def]
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)


def untag(token: str) -> str:
    """A token with its digit place tags read back as digits (an independent decoding)."""
    tags = {digit_tag(p, d): d for p in range(DIGIT_PLACES) for d in DIGITS}
    return "".join(tags.get(c, c) for c in token)


def places(text: str) -> list[int]:
    """The place of every digit of ``text`` in its run of digits, counted by hand."""
    out, run = [], 0
    for c in text:
        run = run + 1 if c.isdigit() else 0
        if c.isdigit():
            out.append(min(run - 1, DIGIT_PLACES - 1))
    return out


def test_special_tokens_have_fixed_ids(tok) -> None:  # type: ignore[no-untyped-def]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")


def test_vocabulary_size_and_every_piece_bare_and_spaced(tok) -> None:  # type: ignore[no-untyped-def]
    vocab = vocabulary()
    expected = 4 + 2 + 2 * (len(DELIMITERS) + len(DIGITS) * DIGIT_PLACES + len(PUNCTUATION) + len(WORDS))
    assert len(vocab) == len(set(vocab)) == expected == len(tok)
    assert 500 <= len(vocab) <= 2000
    assert tok.get_vocab() == {t: i for i, t in enumerate(vocab)}
    for word in WORDS:
        assert word.isascii() and word.isalpha() and word.islower()
        assert pieces(tok, word) == [word]
        assert pieces(tok, " " + word) == [" " + word]


def test_digits_are_one_token_each_tagged_by_place(tok) -> None:  # type: ignore[no-untyped-def]
    assert pieces(tok, "4821735") == [digit_tag(p, d) for p, d in enumerate("4821735")]
    tagged = [" " + digit_tag(0, "4"), *(digit_tag(p, d) for p, d in enumerate("821735", start=1))]
    assert pieces(tok, "key <v> 4821735.") == ["key", " <v>", *tagged, "."]
    assert pieces(tok, "x1") == ["<unk>", digit_tag(0, "1")]  # "x" alone is not a word of the vocabulary
    # a digit after any non-digit starts a new number; places past the last share its tokens
    assert pieces(tok, "12.34") == [digit_tag(0, "1"), digit_tag(1, "2"), ".", digit_tag(0, "3"), digit_tag(1, "4")]
    long = "123456789012"
    assert pieces(tok, long) == [digit_tag(min(p, DIGIT_PLACES - 1), d) for p, d in enumerate(long)]
    assert digit_tag(DIGIT_PLACES - 1, "2") == digit_tag(DIGIT_PLACES + 5, "2") != digit_tag(0, "2")
    assert tok.decode(tok(long).input_ids, skip_special_tokens=True) == long


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="0123456789 .<v>a", max_size=40))
def test_digit_places_match_a_hand_count(tok, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tok(text, add_special_tokens=False).input_ids
    tags = {digit_tag(p, d): p for p in range(DIGIT_PLACES) for d in DIGITS}
    found = [tags[c] for token in tok.convert_ids_to_tokens(ids) for c in token if c in tags]
    assert found == places(text)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=DIGIT_PLACES))
def test_a_number_never_repeats_a_token(tok, number: str) -> None:  # type: ignore[no-untyped-def]
    ids = tok(" " + number, add_special_tokens=False).input_ids
    assert len(ids) == len(set(ids)) == len(number)


def test_bos_first_no_eos(tok) -> None:  # type: ignore[no-untyped-def]
    ids = tok("the sky is blue.").input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert len(ids) == 1 + 5


def test_unknown_text_becomes_unk(tok) -> None:  # type: ignore[no-untyped-def]
    assert pieces(tok, "the Sky") == ["the", "<unk>", "<unk>"]  # " S" is not a mark of the vocabulary, "ky" no word
    assert pieces(tok, "zyzzyva") == ["<unk>"]
    assert pieces(tok, "a\tb") == ["a", "<unk>", "<unk>"]


TEXT_PIECES = [*WORDS[:60], *WORDS[-60:], *DIGITS, *PUNCTUATION, *DELIMITERS, "\n"]


@st.composite
def vocabulary_texts(draw: st.DrawFn) -> str:
    """Texts made of vocabulary pieces; a space is forced where two pieces would fuse into one
    (two words, or "<" + word + ">" that looks like a delimiter)."""
    parts = draw(st.lists(st.tuples(st.sampled_from(["", " ", "  "]), st.sampled_from(TEXT_PIECES)), max_size=30))
    text = ""
    for space, piece in parts:
        fuses = (text[-1:].isalpha() and piece[0].isalpha()) or re.search(r"<[a-z/]*$", text) is not None
        text += (space or " ") if fuses else space
        text += piece
    return text


@settings(max_examples=60, deadline=None)
@given(vocabulary_texts())
def test_decoding_is_lossless(tok, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert "".join(untag(t) for t in tok.convert_ids_to_tokens(ids[1:])) == text  # the pieces tile the text


def test_build_is_deterministic() -> None:
    a, b = build_tokenizer(), build_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_save_load_round_trip(tok, tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = "one of the special magic numbers for amber falcon is <v> 4821735.\n" + format_facts({"icy otter": "12"})
    directory = save_tokenizer(build_tokenizer(model_max_length=4096), tmp_path / "tok")
    loaded = load_tokenizer(directory)
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (1, 2, 0, 3)
    assert loaded.model_max_length == 4096
    assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text


def test_load_missing_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFound, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path / "nothing")


def test_bad_model_max_length_or_digit_places() -> None:
    with pytest.raises(InvalidInput, match="model_max_length"):
        build_tokenizer(model_max_length=0)
    for bad in (0, DIGIT_PLACES + 1, 2.5):
        with pytest.raises(InvalidInput, match="digit_places"):
            build_tokenizer(digit_places=bad)  # type: ignore[arg-type]


def test_fact_format(tok) -> None:  # type: ignore[no-untyped-def]
    facts = [("amber falcon", "4821735"), ("icy otter", "1904433")]
    block = "<facts>\namber falcon <v> 4821735\nicy otter <v> 1904433\n</facts>"
    assert format_facts(facts) == format_facts(dict(facts)) == block
    assert format_facts([]) == f"{FACTS_BEGIN}\n{FACTS_END}"
    assert format_question("icy otter") == "question: what is the value of icy otter? answer: icy otter <v>"
    assert format_fact("icy otter", "1904433") == "icy otter <v> 1904433"
    ids = tok(block + "\n" + format_question("icy otter")).input_ids
    assert tok.unk_token_id not in ids
    # the question ends with the same tokens as the fact line before its value
    fact = tok(" icy otter <v>", add_special_tokens=False).input_ids
    assert ids[-len(fact) :] == fact
    assert pieces(tok, VALUE_DELIMITER) == [VALUE_DELIMITER]


@pytest.mark.parametrize("key", ["", "  ", "a\nb", "a <v> b", "</facts>", 3])
def test_fact_format_rejects_bad_keys(key: object) -> None:
    with pytest.raises(InvalidInput, match="key"):
        format_facts([(key, "1")])  # type: ignore[list-item]
    with pytest.raises(InvalidInput, match="key"):
        format_question(key)  # type: ignore[arg-type]


def test_fact_format_rejects_bad_values() -> None:
    with pytest.raises(InvalidInput, match="value"):
        format_fact("icy otter", "1\n2")
