"""How the engine reads a prompt and writes retrieved facts into it.

- :func:`split_prompt`: the *question* is the prompt's last non-empty line, the *document* all
  before it. Retrieval searches with the question; facts go between the two, right before the
  question, so that every KV policy (a sliding window too) keeps them.
- :func:`with_facts`: ``document + " " + format_facts(facts) + "\\n\\n" + question``, the layout of
  the ``facts_in_text`` task the reference model is trained on (the facts block alone when there is
  no document).
- :func:`parse_fact`: what :meth:`memfusion.Engine.remember` stores: ``"The vault code is 4721."``
  -> key ``"vault code"``, value ``"4721"`` (the text before / after the last `` is ``, ``=`` or
  ``:``; articles and the final period dropped; lower case keys). Text without such a split is kept
  whole as the value of a key derived from its hash.
- :func:`facts_in_prompt`: the ``key <v> value`` lines of the ``<facts>`` blocks a user wrote in a
  prompt (what write-back stores).
"""

from __future__ import annotations

import hashlib
import re

from memfusion.errors import InvalidInput
from memfusion.models.tokenizer import FACTS_BEGIN, FACTS_END, VALUE_DELIMITER, format_facts

_SPLIT = re.compile(
    r"^(?P<key>.+)\s+(?:is|are|was|equals)\s+(?P<value>.+?)\s*$|^(?P<k2>[^=:]+?)\s*[=:]\s*(?P<v2>.+?)\s*$"
)
_ARTICLE = re.compile(r"^(the|a|an|my|our|your)\s+")
_FACT_LINE = re.compile(r"^\s*(?P<key>[^\n<]+?)\s+" + re.escape(VALUE_DELIMITER) + r"\s+(?P<value>[^\n<]+?)\s*$")


def split_prompt(prompt: str) -> tuple[str, str]:
    """``(document, question)``: the question is the last non-empty line (kept as written), the
    document everything before it with trailing whitespace removed."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInput("the prompt must be a non-empty string")
    body = prompt.rstrip()
    cut = body.rfind("\n")
    if cut < 0:
        return "", body
    return body[:cut].rstrip(), body[cut + 1 :]


def _clean(text: str) -> str:
    return " ".join(text.replace(VALUE_DELIMITER, " ").replace(FACTS_BEGIN, " ").replace(FACTS_END, " ").split())


def parse_fact(text: str) -> tuple[str, str]:
    """``(key, value)`` of a remembered sentence (see the module docstring)."""
    if not isinstance(text, str) or not _clean(text):
        raise InvalidInput("a memory must be a non-empty string")
    sentence = _clean(text).rstrip(".!")
    m = _SPLIT.match(sentence)
    if m is not None:
        key = (m.group("key") or m.group("k2") or "").strip().lower()
        value = (m.group("value") or m.group("v2") or "").strip()
        key = _ARTICLE.sub("", key).strip(" ,;")
        if key and value:
            return key, value
    return "note " + hashlib.sha256(sentence.encode()).hexdigest()[:12], sentence


def with_facts(document: str, facts: list[tuple[str, str]], question: str) -> str:
    """The prompt with ``facts`` (key, value) put right before the question."""
    if not facts:
        return f"{document}\n{question}" if document else question
    block = format_facts([(_clean(k), _clean(v)) for k, v in facts])
    return f"{document} {block}\n\n{question}" if document else f"{block}\n{question}"


def key_in_context(key: str, document: str) -> bool:
    """Whether ``key`` occurs in ``document`` as whole words (case-insensitive)."""
    words = _clean(key).lower()
    if not words:
        return False
    return (
        re.search(r"(?<![a-z0-9])" + re.escape(words) + r"(?![a-z0-9])", " ".join(document.lower().split())) is not None
    )


def facts_in_prompt(prompt: str) -> list[tuple[str, str]]:
    """``(key, value)`` of every ``key <v> value`` line inside ``<facts>`` ... ``</facts>`` blocks."""
    out: list[tuple[str, str]] = []
    for block in re.findall(re.escape(FACTS_BEGIN) + r"(.*?)" + re.escape(FACTS_END), prompt, flags=re.S):
        for line in block.split("\n"):
            m = _FACT_LINE.match(line)
            if m is not None:
                out.append((m.group("key").strip(), m.group("value").strip()))
    return out
