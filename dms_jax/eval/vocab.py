"""The word inventory of the synthetic long-context tasks (one token per word).

Everything is generated from fixed seeds, so the vocabulary, and hence the tokenizer trained on
task text, is the same on every machine. Word classes are disjoint: keys, values, variables and
filler words never share a spelling, so a scorer can tell an answer from filler by its class.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
# structure words of the task formats (never used by the filler grammar)
QUERY = "?"  # starts a question: "? K" -> the answer, then END
END = "."  # ends a sentence, a fact and an answer
FACT = "key"  # reserved (facts read "K V ."; kept so token ids stay stable)
IS = "is"  # reserved (kept so token ids stay stable)
VAR = "VAR"  # variable tracking: "VAR 57 XA ." (XA takes 57) / "VAR XA YB ." (YB takes XA)
ASSIGN = "="  # reserved
LIST = "list"  # word extraction: "list w w w ... ." then "? common" -> the most frequent words
COMMON = "common"
STRUCTURE = (QUERY, END, FACT, IS, VAR, ASSIGN, LIST, COMMON)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _pseudo_words(count: int, seed: int, syllables: tuple[int, ...], exclude: set[str]) -> list[str]:
    """`count` distinct pronounceable lowercase pseudo-words (CV syllables, optional final C)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen = set(exclude)
    while len(out) < count:
        n = int(rng.choice(syllables))
        word = "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(n))
        if rng.random() < 0.5:
            word += rng.choice(list(_CONSONANTS))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


@functools.lru_cache(maxsize=None)
def word_classes() -> dict[str, tuple[str, ...]]:
    """The fixed word classes: keys, values, variables and the filler parts of speech."""
    taken = set(STRUCTURE)
    keys = tuple(w.capitalize() for w in _pseudo_words(64, 1, (2,), set()))  # "Bamo", ...
    values = tuple(str(n) for n in range(10, 74))  # 64 two-digit numbers
    variables = tuple("".join(p) for p in itertools.product("XYZW", "ABCDEFGH"))  # 32: "XA" ...
    filler = _pseudo_words(168, 2, (1, 2), taken | {k.lower() for k in keys})
    return {
        "keys": keys,
        "values": values,
        "variables": variables,
        "determiners": tuple(filler[:8]),
        "adjectives": tuple(filler[8:40]),
        "nouns": tuple(filler[40:104]),
        "verbs": tuple(filler[104:136]),
        "prepositions": tuple(filler[136:152]),
        "adverbs": tuple(filler[152:168]),
    }


def all_words() -> list[str]:
    """Every word a task can emit, specials first (the tokenizer's vocabulary order)."""
    classes = word_classes()
    words = list(SPECIAL_TOKENS) + list(STRUCTURE)
    for name in ("keys", "values", "variables", "determiners", "adjectives", "nouns", "verbs",
                 "prepositions", "adverbs"):
        words.extend(classes[name])
    assert len(words) == len(set(words)), "word classes overlap"
    return words
