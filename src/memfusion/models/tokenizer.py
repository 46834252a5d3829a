"""The reference model's tokenizer: a fixed, word-level vocabulary built offline and deterministically.

Design of the vocabulary (ids are stable: the same code always builds the same ``tokenizer.json``):

- ids 0-3 are the special tokens ``<pad>`` ``<s>`` (bos) ``</s>`` (eos) ``<unk>``; ``<s>`` is put
  before every encoded text (Llama style), ``</s>`` ends a training answer;
- task delimiters :data:`DELIMITERS`: ``<v>`` comes right before every value (in a needle, a fact,
  and at the end of every prompt, where the answer starts); ``<facts>`` / ``</facts>`` bracket a
  block of facts (:func:`format_facts`). They are ordinary tokens: decoding keeps them;
- ``"\\n"``, ``" "``, ASCII punctuation and the digits: **one digit per token, tagged with its
  place in its number** (:data:`DIGIT_PLACES`): the ``4`` of ``"4821735"`` and the ``4`` of
  ``"1904433"`` are different tokens (place 0 and place 5), so a 7-digit value is 7 tokens that
  never repeat within it. Copying a number is then an unambiguous one-token match (the token
  after "my current digit-and-place" in the source), where with bare digits a value with a
  repeated digit (94% of 7-digit values) leaves the model two places to continue from, and most
  copy errors of the models trained so were the value's next digit. This is the Abacus
  embedding of McLeish et al. 2024 (arXiv 2405.17399: an embedding of each digit's place within
  its number), folded into the token: the normalizer maps a digit at place ``p`` to the private-use
  character :func:`digit_tag` ``(p, d)`` and the decoder maps it back, so texts and decoded
  outputs only ever show plain digits;
- the words of :data:`WORDS` (lower-case ``a-z``): task templates, filler text for haystacks, keys,
  variable names.

Every word, digit, punctuation mark and delimiter exists twice, bare (``"green"``) and with its
leading space (``" green"``), so a text splits into pieces ``" ?word"`` / ``" ?digit"`` /
``" ?mark"`` and decoding is the exact concatenation of the pieces (lossless; no clean-up of
spaces). Anything else (upper-case letters, unknown words, tabs) encodes to ``<unk>``: the task
generators check their prompts for ``<unk>`` and refuse a tokenizer that cannot spell them. The
whole vocabulary is 1464 tokens, which keeps the embedding table of the reference model small.

``tokenizers`` and ``transformers`` are imported inside the functions, so importing this module
(as the task generators do, for :data:`WORDS`) costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from memfusion.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
VALUE_DELIMITER = "<v>"
"""Comes right before a value: ``"amber falcon <v> 4821735"``; every task prompt ends with it."""
FACTS_BEGIN, FACTS_END = "<facts>", "</facts>"
DELIMITERS: tuple[str, ...] = (VALUE_DELIMITER, FACTS_BEGIN, FACTS_END)
DIGITS: tuple[str, ...] = tuple("0123456789")
PUNCTUATION: tuple[str, ...] = tuple(".,:;?!'\"-()[]{}=+*/_%&#@<>|~`$^\\")
DIGIT_PLACES = 10
"""Digits at places ``0 .. DIGIT_PLACES - 2`` of a number (from the left) get tokens of their own;
all later places share the tokens of place ``DIGIT_PLACES - 1``. ``build_tokenizer(digit_places=1)``
is the same tokenizer with bare digits (every place reads as place 0): training starts with it (see
:mod:`memfusion.models.reference_train`), and since the tags of places 1 and later come last in the
vocabulary, its token ids are the first ids of the full tokenizer."""
_TAG_BASE = 0xE000  # Unicode private-use area: never in task text


def digit_tag(place: int, digit: str) -> str:
    """The character that stands for ``digit`` at ``place`` of its number inside the tokenizer
    (its tokens are this character, bare and with a leading space). Reserved: a text containing
    these private-use characters reads as digits."""
    return chr(_TAG_BASE + 10 * min(place, DIGIT_PLACES - 1) + int(digit))


def _tags(place: int) -> str:
    return "".join(digit_tag(place, d) for d in DIGITS)


def _check_places(digit_places: int) -> None:
    if not isinstance(digit_places, int) or not 1 <= digit_places <= DIGIT_PLACES:
        raise InvalidInput(f"digit_places must be an integer in [1, {DIGIT_PLACES}], got {digit_places!r}")

PIECE_PATTERN = r" ?<[a-z/]+>|\n| ?[a-z]+| ?[^\sa-z]| "
"""How a text is cut before lookup (after the digits became place tags): delimiters, newlines,
words, single tagged digits and single marks, each with an optional leading space; a run of spaces
gives one ``" "`` piece per extra space."""


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


TEMPLATE_WORDS = _words(
    """a about above according afterwards again all an and answer appear appeared are ask assigned
    assignments back below blue chain coded common facts fact find following for frequency frequently
    gives go grass green here hidden i important in info information inside irrelevant is it its key
    list lot magic make memorize mentioned more most number numbered numbers of often one ones others
    pass provided question quiz read remember some special sun sure sky text than that the them there
    these they to top track value var variable variables we what which will within word words yellow
    you"""
)
"""Every word of the task templates (``memfusion.bench.tasks``) and of RULER's noise haystack."""

KEY_ADJECTIVES = _words(
    """amber azure bold brave brisk calm clever coral crimson curly dapper eager fancy fierce frosty
    giant golden happy humble icy ivory jolly keen lively lucky mellow misty modest noble olive
    orange pale plain proud purple quick rapid rosy royal rusty scarlet shiny silver sleepy sly
    smart snowy solar sonic spotted stormy sturdy sunny swift tawny tidy tiny violet vivid wild
    witty zesty agile ruby"""
)
KEY_NOUNS = _words(
    """badger beaver bison camel cobra condor coyote crane cricket dolphin donkey eagle falcon ferret
    finch gecko gopher heron hornet ibis iguana jackal jaguar koala lemur leopard lizard llama
    lobster lynx magpie marmot moose mouse newt ocelot octopus oriole osprey otter owl panda panther
    parrot pelican penguin pigeon puffin python quail rabbit raccoon raven robin salmon seal shark
    sparrow squid stork swan tiger toad trout turkey turtle viper walrus weasel whale wolf wombat yak
    zebra anchor arrow banner basket beacon bell blanket bottle bucket candle canoe castle chariot
    compass crown drum feather fiddle flag flute goblet hammer harp helmet kettle ladder lantern
    locket mirror paddle piano pillow ribbon saddle scroll shield spoon tablet teapot thimble torch
    trumpet violin wagon whistle acorn barrel button carpet pebble quill kite cabin lute"""
)
"""Keys are ``"adjective noun"`` pairs: 64 x 128 = 8192 distinct keys."""

NAMES = _words(
    """ada alma amos anya arlo bea bram cato cleo dara dex eli ella emil ezra fay finn gus hana hugo
    ida igor ines ivo jada jonas juno kai kira lars lena leo lina lou mae milo mira nell nico noa
    odin olga omar otto pia rhea rosa rune saul sven tess theo tova uma vera wade wren yara yuri
    zane zara zeke zoe abel cora"""
)
"""Variable names of the variable-tracking task."""

FILLER_DETERMINERS = _words("the a this that every one each")
FILLER_NOUNS = _words(
    """river mountain city town village road bridge forest garden house door table book letter story
    song market harbor ship train station field farm tree flower stone wall tower hill valley lake
    sea island cloud rain wind snow moon star morning evening night day week year season winter
    summer spring autumn teacher student farmer baker doctor painter writer child friend neighbor
    traveler merchant queen soldier sailor music paper bread coffee tea water fire light shadow
    voice idea plan problem reason machine tool map path school library kitchen room street corner
    bench clock coin gift box lamp window boat bird horse dog cat fish apple cake chair"""
)
FILLER_VERBS = _words(
    """builds carries crosses follows finds holds keeps leaves moves opens passes reaches reads brings
    watches writes sells buys paints draws cleans fixes visits greets remembers forgets seeks shows
    sends takes makes covers fills lifts pulls pushes shapes guards feeds plants studies counts
    measures gathers shares warms hears sees likes needs"""
)
FILLER_ADJECTIVES = _words(
    """old new small large quiet busy warm cold bright dark red white black brown gray long short
    narrow wide tall deep soft hard heavy early late young ancient simple strange famous gentle
    careful patient distant empty full clean dusty rainy windy silent wooden open favorite little
    pleasant steady rough smooth fresh"""
)
FILLER_ADVERBS = _words(
    """slowly quickly often rarely always never quietly carefully gently later soon today together
    still finally usually sometimes daily"""
)
FILLER_PREPOSITIONS = _words(
    """near across along behind beside under over past toward around through into beyond above below
    inside outside within"""
)
FILLER_WORDS = tuple(
    sorted(
        set(
            FILLER_DETERMINERS
            + FILLER_NOUNS
            + FILLER_VERBS
            + FILLER_ADJECTIVES
            + FILLER_ADVERBS
            + FILLER_PREPOSITIONS
            + ("and", "an")
        )
    )
)
"""Words of the essay-like haystack (sentences of determiner / adjective / noun / verb / ...)."""

WORDS: tuple[str, ...] = tuple(sorted(set(TEMPLATE_WORDS + KEY_ADJECTIVES + KEY_NOUNS + NAMES + FILLER_WORDS)))
"""Every word of the vocabulary, sorted (the order fixes the token ids)."""


def vocabulary(digit_places: int = DIGIT_PLACES) -> list[str]:
    """The tokens in id order: specials, ``"\\n"``, ``" "``, then delimiters, the digits at place 0,
    punctuation, words and the digits at places 1 .. ``digit_places - 1``, each bare and with a
    leading space (so the ids of ``vocabulary(1)`` are the first ids of every larger one)."""
    tokens = [*SPECIAL_TOKENS, "\n", " "]
    _check_places(digit_places)
    later = [digit_tag(place, d) for place in range(1, digit_places) for d in DIGITS]
    for piece in (*DELIMITERS, *(digit_tag(0, d) for d in DIGITS), *PUNCTUATION, *WORDS, *later):
        tokens += [piece, " " + piece]
    if len(set(tokens)) != len(tokens):  # a word list edit that collides with another piece
        raise RuntimeError("the reference vocabulary has duplicate tokens")
    return tokens


def _digit_normalizer(digit_places: int) -> list[object]:
    """Replace passes that turn every digit into its place tag, place by place from the left: a
    digit with no digit before it is at place 0; one after a place-``p`` tag is at place ``p + 1``;
    whatever digits remain after the passes of places ``0 .. digit_places - 2`` take the last."""
    from tokenizers import Regex, normalizers

    passes: list[object] = []
    tagged = f"{digit_tag(0, '0')}-{digit_tag(DIGIT_PLACES - 1, '9')}"
    for place in range(digit_places):
        if place == digit_places - 1:
            before = ""
        elif place == 0:
            before = f"(?<![0-9{tagged}])"  # nor a digit tagged by an earlier pass
        else:
            before = f"(?<=[{_tags(place - 1)}])"
        passes += [normalizers.Replace(Regex(before + d), digit_tag(place, d)) for d in DIGITS]
    return passes


def build_tokenizer(model_max_length: int | None = None, digit_places: int = DIGIT_PLACES) -> PreTrainedTokenizerFast:
    """Build the reference tokenizer (no file, no network): the same call gives the same tokenizer.

    ``model_max_length``: the context limit of the model it goes with (``None`` = no limit); the task
    generators refuse longer prompts. ``digit_places``: how many places of a number have tokens of
    their own (:data:`DIGIT_PLACES`; 1 = bare digits). ``tokenizer(text).input_ids`` starts with ``<s>``;
    ``decode(ids, skip_special_tokens=True)`` gives back ``text`` exactly when ``text`` is in the
    vocabulary.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if model_max_length is not None and model_max_length < 1:
        raise InvalidInput(f"model_max_length must be a positive number of tokens or None, got {model_max_length}")
    ids = {token: i for i, token in enumerate(vocabulary(digit_places))}
    backend = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    backend.normalizer = normalizers.Sequence(_digit_normalizer(digit_places))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    untag = [decoders.Replace(digit_tag(place, d), d) for place in range(digit_places) for d in DIGITS]
    backend.decoder = decoders.Sequence([*untag, decoders.Fuse()])  # pieces carry their spaces: concatenation
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, ids[BOS])]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        **extra,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Write ``tokenizer`` to the directory ``path`` (``save_pretrained``); returns the directory."""
    directory = Path(path)
    tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer` (or any local HF tokenizer directory), offline."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(path)
    if not (directory / "tokenizer.json").is_file():
        raise NotFound(f"no tokenizer at {directory}: expected a directory with tokenizer.json (save_tokenizer)")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


# --- the fact-lookup format ------------------------------------------------------------------
# The reference model is trained on it (the kv_lookup task) and the engine writes retrieved facts
# with it, so both put facts in context the same way. It lives here, beside the delimiters, so the
# engine can use it without importing the benchmark layer.


def _check_fact_text(kind: str, text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"a fact's {kind} must be a non-empty string, got {text!r}")
    if "\n" in text or any(d in text for d in DELIMITERS):
        raise InvalidInput(
            f"a fact's {kind} may not contain a newline or a delimiter {DELIMITERS}: they separate facts; got {text!r}"
        )


def format_fact(key: str, value: str) -> str:
    """One fact line, ``"key <v> value"`` (no newline)."""
    _check_fact_text("key", key)
    _check_fact_text("value", value)
    return f"{key} {VALUE_DELIMITER} {value}"


def format_facts(facts: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """A block of facts, one per line, between ``<facts>`` and ``</facts>``::

        <facts>
        amber falcon <v> 4821735
        icy otter <v> 1904433
        </facts>

    ``facts`` is a mapping or (key, value) pairs, kept in the given order. Keys and values may not
    contain a newline or a delimiter.
    """
    pairs = list(facts.items()) if isinstance(facts, Mapping) else list(facts)
    lines = [format_fact(key, value) for key, value in pairs]
    return "\n".join([FACTS_BEGIN, *lines, FACTS_END])


def format_question(key: str) -> str:
    """The question about one key; it ends with ``"key <v>"``, the same words as the fact line, so
    the answer (the value) is what follows them there."""
    _check_fact_text("key", key)
    return f"question: what is the value of {key}? answer: {key} {VALUE_DELIMITER}"
