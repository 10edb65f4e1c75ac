"""Seeded long-context tasks in the style of RULER (Hsieh et al., 2024), on a word-level vocabulary.

Every task renders an `Example`: a context (facts or lists hidden in generated filler) followed by
one or more questions. A question is `? X` and its answer is one or more words then `.`:

    niah_single      one fact `K V .` in filler; `? K` -> `V`
    niah_multikey    several facts with distinct keys (distractors); one is asked
    niah_multivalue  one key with several values in separate facts; `? K` -> all values
    niah_multiquery  several facts; several keys are asked, one question per turn
    mqar             multi-query associative recall: many facts, many questions (Zoology's MQAR)
    vt               variable tracking: `VAR 57 XA .` (XA takes 57) then `VAR XA YB .` (YB takes
                     XA) ... through filler; `? 57` -> every variable that holds 57 (the chain,
                     in order)
    cwe              common words extraction: `list w w w ... .`; `? common` -> the most frequent
                     words
    copy             (training warm-up) `list w w w ... .`; `? list` -> the list again
    echo             (training warm-up) triples `x y x`
    repeat           (training warm-up) segments of words recur at random distances; `? w` ->
                     the word that followed `w`

A question repeats the words that introduced what it asks (`? K` answered by what followed `K`),
so the answer is always "what came after this word last time": the induction pattern that small
attention models learn fastest. Questions after the first are asked as further turns on the same context (the model's own
earlier answers stay in context), as a chat would. Filler is sentences from a seeded grammar
over 160 pseudo-words, so no fixed sentence repeats and filler cannot be told apart by surface.
Token counts are word counts (one token per word, plus `<s>`), so lengths are exact.

Seeds: `split="train"` and `split="eval"` draw from disjoint random streams
(`numpy.random.default_rng((task id, split id, seed))`), so no evaluation example is ever a
training example.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from dms_jax.eval import vocab as V

SPLITS = {"train": 0, "eval": 1}


class TaskError(ValueError):
    """An unknown task, a bad parameter, or a length too short for the task."""


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    context: tuple[str, ...]  # words before the first question (no <s>)
    questions: tuple[tuple[str, ...], ...]  # each `? X`
    answers: tuple[tuple[str, ...], ...]  # reference words of each question's answer
    params: tuple = ()  # (name, value) pairs the example was made with (length, depth ...)
    context_targets: tuple[int, ...] = ()  # context words that are targets too (warm-ups)

    @property
    def num_tokens(self) -> int:
        """Tokens of the whole document with the reference answers (with <s>)."""
        return 1 + len(self.context) + sum(len(q) + len(a) + 1 for q, a in zip(self.questions, self.answers))

    def prompt_text(self) -> str:
        """The context and the first question: what a model is asked to continue."""
        return " ".join(self.context + self.questions[0])

    def document_words(self) -> tuple[list[str], list[int]]:
        """The training document (context, each question, its answer and `.`) and a target flag
        per word: 1 on the answer words and their `.`, the only words a model can predict."""
        words, target = list(self.context), [0] * len(self.context)
        for i in self.context_targets:
            target[i] = 1
        for q, a in zip(self.questions, self.answers):
            words += list(q) + list(a) + [V.END]
            target += [0] * len(q) + [1] * (len(a) + 1)
        return words, target


# ----------------------------------------------------------------------------------------------
# scoring (RULER's string_match_all, on whole words)


def answer_words(generated_text: str) -> list[str]:
    """The words of a generated answer, up to its first `.`."""
    words = generated_text.split()
    return words[:words.index(V.END)] if V.END in words else words


def string_match_all(generated_text: str, references) -> float:
    """Fraction of the reference words found in the answer (RULER's string_match_all)."""
    found = set(answer_words(generated_text))
    return sum(r in found for r in references) / len(references)


def exact_match(generated_text: str, references) -> float:
    """1 when the answer is exactly the references (in order), else 0."""
    return float(answer_words(generated_text) == list(references))


def score_answer(generated_text: str, references) -> float:
    """Exact match for a one-word answer, string_match_all for several."""
    if len(references) == 1:
        return exact_match(generated_text, references)
    return string_match_all(generated_text, references)


def score_example(example: Example, generated_texts) -> float:
    """Mean over the example's questions of `score_answer`."""
    if len(generated_texts) != len(example.questions):
        raise TaskError(f"{example.task}: {len(generated_texts)} answers for {len(example.questions)} questions")
    return float(np.mean([score_answer(g, a) for g, a in zip(generated_texts, example.answers)]))


# ----------------------------------------------------------------------------------------------
# filler and layout


def filler_sentence(rng) -> list[str]:
    """`det [adj] noun verb det [adj] noun [prep det noun] [adverb] .` (4-13 words)."""
    c = V.word_classes()
    pick = lambda name: str(c[name][rng.integers(len(c[name]))])  # noqa: E731
    words = [pick("determiners")]
    if rng.random() < 0.5:
        words.append(pick("adjectives"))
    words += [pick("nouns"), pick("verbs"), pick("determiners")]
    if rng.random() < 0.5:
        words.append(pick("adjectives"))
    words.append(pick("nouns"))
    if rng.random() < 0.4:
        words += [pick("prepositions"), pick("determiners"), pick("nouns")]
    if rng.random() < 0.3:
        words.append(pick("adverbs"))
    return words + [V.END]


def filler(rng, num_words: int) -> list[list[str]]:
    """Sentences totalling exactly num_words words (the last one cut short, ending in `.`)."""
    sentences, total = [], 0
    while total < num_words:
        s = filler_sentence(rng)
        room = num_words - total
        if len(s) > room:
            s = s[:room - 1] + [V.END] if room > 1 else [V.END]
        sentences.append(s)
        total += len(s)
    return sentences


def place(rng, items: list[list[str]], num_filler: int, depths=None) -> list[str]:
    """Insert `items` (word lists) between filler sentences totalling num_filler words.

    depths: a fraction in [0, 1] per item (0 = start of the context, 1 = its end), or None for
    uniformly random depths. Items keep their order when depths are equal.
    """
    sentences = filler(rng, num_filler)
    if depths is None:
        depths = sorted(rng.random(len(items)))
    slots = [min(len(sentences), int(round(d * len(sentences)))) for d in depths]
    out: list[str] = []
    order = sorted(range(len(items)), key=lambda i: (slots[i], i))
    k = 0
    for s_index in range(len(sentences) + 1):
        while k < len(order) and slots[order[k]] == s_index:
            out += items[order[k]]
            k += 1
        if s_index < len(sentences):
            out += sentences[s_index]
    return out


def fact(key: str, value: str) -> list[str]:
    """`K V .`: a key (a capitalised word, a class filler never uses) and its value. No marker
    word comes first: with the same word before every key, a small model's induction heads
    match the marker rather than the key (measured: 0-15% recall with `key K V .` against
    67-69% with `K V .` for the same model)."""
    return [key, value, V.END]


def _distinct(rng, pool, n: int) -> list[str]:
    if n > len(pool):
        raise TaskError(f"asked for {n} distinct words from a class of {len(pool)}")
    return [str(pool[i]) for i in rng.choice(len(pool), n, replace=False)]


def _need(task: str, length: int, fixed: int, what: str) -> int:
    """Filler words left after `fixed` words; a clear error when the length is too short."""
    room = length - 1 - fixed
    if room < 0:
        raise TaskError(f"{task}: length {length} is too short for {what} ({fixed + 1} tokens "
                        f"needed before any filler); use length >= {fixed + 1}")
    return room


# ----------------------------------------------------------------------------------------------
# the tasks (each: rng, length, **params -> (context, questions, answers))


def _niah(rng, length, *, task, num_facts, num_queries, num_values=1, depth=None):
    c = V.word_classes()
    if num_values > 1:  # one key, several values
        key = _distinct(rng, c["keys"], 1)[0]
        values = _distinct(rng, c["values"], num_values)
        items = [fact(key, v) for v in values]
        questions, answers = [(V.QUERY, key)], [tuple(values)]
    else:
        keys = _distinct(rng, c["keys"], num_facts)
        values = [str(c["values"][i]) for i in rng.integers(len(c["values"]), size=num_facts)]
        items = [fact(k, v) for k, v in zip(keys, values)]
        asked = rng.choice(num_facts, num_queries, replace=False)
        questions = [(V.QUERY, keys[i]) for i in asked]
        answers = [(values[i],) for i in asked]
    fixed = sum(map(len, items)) + sum(len(q) + len(a) + 1 for q, a in zip(questions, answers))
    room = _need(task, length, fixed, f"{len(items)} fact(s) and {len(questions)} question(s)")
    depths = None
    if depth is not None:
        if not 0.0 <= float(depth) <= 1.0:
            raise TaskError(f"{task}: depth={depth} must be in [0, 1]")
        depths = [float(depth)] * len(items)
    return place(rng, items, room, depths), questions, answers


def niah_single(rng, length, depth=None):
    return _niah(rng, length, task="niah_single", num_facts=1, num_queries=1, depth=depth)


def niah_multikey(rng, length, num_facts=4, depth=None):
    if num_facts < 2:
        raise TaskError(f"niah_multikey: num_facts={num_facts} must be >= 2 (one needle and distractors)")
    return _niah(rng, length, task="niah_multikey", num_facts=num_facts, num_queries=1, depth=depth)


def niah_multivalue(rng, length, num_values=3, depth=None):
    if num_values < 2:
        raise TaskError(f"niah_multivalue: num_values={num_values} must be >= 2")
    return _niah(rng, length, task="niah_multivalue", num_facts=num_values, num_queries=1,
                 num_values=num_values, depth=depth)


def niah_multiquery(rng, length, num_facts=4, num_queries=2, depth=None):
    if not 1 <= num_queries <= num_facts:
        raise TaskError(f"niah_multiquery: num_queries={num_queries} must be in [1, num_facts={num_facts}]")
    return _niah(rng, length, task="niah_multiquery", num_facts=num_facts, num_queries=num_queries,
                 depth=depth)


def mqar(rng, length, num_facts=None, num_queries=None):
    """Many facts (default: as many as fill about half the length), half of them asked."""
    if num_facts is None:
        num_facts = max(2, min(len(V.word_classes()["keys"]), (length // 2) // 8))
    if num_queries is None:
        num_queries = max(1, num_facts // 2)
    if not 1 <= num_queries <= num_facts:
        raise TaskError(f"mqar: num_queries={num_queries} must be in [1, num_facts={num_facts}]")
    return _niah(rng, length, task="mqar", num_facts=num_facts, num_queries=num_queries)


def vt(rng, length, hops=2, num_chains=2):
    """`num_chains` chains of `hops` assignments after the first, the first chain is asked."""
    c = V.word_classes()
    if hops < 1 or num_chains < 1:
        raise TaskError(f"vt: hops={hops} and num_chains={num_chains} must be >= 1")
    names = _distinct(rng, c["variables"], num_chains * (hops + 1))
    values = _distinct(rng, c["values"], num_chains)
    items, chains = [], []
    for ci in range(num_chains):
        chain = names[ci * (hops + 1):(ci + 1) * (hops + 1)]
        chains.append(chain)
        items.append([V.VAR, values[ci], chain[0], V.END])
        for prev, name in zip(chain, chain[1:]):
            items.append([V.VAR, prev, name, V.END])
    # each chain's assignments in order; chains interleaved at random
    order = []
    pending = [list(range(ci * (hops + 1), (ci + 1) * (hops + 1))) for ci in range(num_chains)]
    while any(pending):
        ci = int(rng.choice([i for i, p in enumerate(pending) if p]))
        order.append(pending[ci].pop(0))
    items = [items[i] for i in order]
    questions, answers = [(V.QUERY, values[0])], [tuple(chains[0])]
    fixed = sum(map(len, items)) + 2 + len(chains[0]) + 1
    room = _need("vt", length, fixed, f"{num_chains} chain(s) of {hops} hop(s)")
    return place(rng, items, room), questions, answers


def cwe(rng, length, num_common=3, common_freq=None, num_words=None, boost=1.0):
    """A word list where `num_common` words appear `common_freq` times and the others at most
    half as often; `? common` -> the common words (any order). The default frequency fills a
    quarter of the list with the common words; `boost` multiplies it (an easier training
    variant: a wider gap between the common words and the rest)."""
    pool = V.word_classes()["nouns"]
    fixed = 2 + 2 + num_common + 1  # list ... . ? common <answers> .
    size = num_words if num_words is not None else length - 1 - fixed
    _need("cwe", length, fixed + size, f"a list of {size} words")
    if common_freq is None:
        common_freq = max(3, int(boost * max(3, size // (4 * num_common))))
    if num_common * common_freq > size:
        raise TaskError(f"cwe: {num_common} common words x {common_freq} > list size {size}; "
                        "use a longer length or a lower common_freq")
    common = _distinct(rng, pool, num_common)
    others = [w for w in pool if w not in common]
    rest = size - num_common * common_freq
    cap = max(1, common_freq // 2)  # an uncommon word appears at most half as often
    if rest > cap * len(others):
        raise TaskError(f"cwe: the list of {size} words cannot be filled with uncommon words "
                        f"appearing at most {cap} times; raise common_freq")
    counts = np.zeros(len(others), int)
    for _ in range(rest):
        free = np.flatnonzero(counts < cap)
        counts[free[rng.integers(len(free))]] += 1
    words = [w for w in common for _ in range(common_freq)]
    words += [w for w, n in zip(others, counts) for _ in range(n)]
    words = [words[i] for i in rng.permutation(len(words))]
    context = [V.LIST] + words + [V.END]
    pad = length - 1 - len(context) - (2 + num_common + 1)
    context += [w for s in filler(rng, pad) for w in s] if pad > 0 else []
    return context, [(V.QUERY, V.COMMON)], [tuple(common)]


def copy(rng, length, num_words=None):
    """A warm-up task: `list w w w ... .` then `? list` -> the whole list again, in order.

    Every answer word is "the word that followed the previous word last time", so the task
    trains the induction circuit that recall needs on most of its tokens (not in EVAL_TASKS)."""
    pool = [w for name in ("keys", "values", "nouns") for w in V.word_classes()[name]]
    if num_words is None:
        num_words = max(1, (length - 6) // 2)
    fixed = 2 * num_words + 5  # list w... . ? list w... .
    room = _need("copy", length, fixed, f"a list of {num_words} words and its copy")
    words = [str(pool[i]) for i in rng.integers(len(pool), size=num_words)]
    context = [w for sentence in filler(rng, room) for w in sentence] if room else []
    context += [V.LIST] + words + [V.END]
    return context, [(V.QUERY, V.LIST)], [tuple(words)]


def echo(rng, length):
    """A warm-up task: triples `x y x`; each third word repeats the word two before it.

    Predicting it is one attention hop back to the previous token and a copy: a direct signal
    for the previous-token heads that recall composes with (not in EVAL_TASKS). The question
    `? list` asks for the last triple's first word again."""
    pool = [w for name in ("keys", "values", "nouns") for w in V.word_classes()[name]]
    triples = (length - 1 - 4) // 3
    if triples < 1:
        raise TaskError(f"echo: length {length} is too short (at least 8 tokens)")
    context = []
    for _ in range(triples):
        x, y = (str(pool[i]) for i in rng.integers(len(pool), size=2))
        context += [x, y, x]
    room = length - 1 - len(context) - 4
    x, y = context[-3], context[-2]
    repeats = tuple(range(2, len(context), 3))  # each triple's third word
    context += [V.END] * room
    return context, [(V.QUERY, x)], [(y,)], repeats


def repeat(rng, length):
    """A warm-up task: words in which segments recur at random distances, then `? w` -> the word
    that followed `w` (a word that occurs once in the context).

    Every word of a recurring segment after its first is "what followed the previous word last
    time" at a distance no layout gives away, so it is a target: the induction circuit that
    recall needs is the only way to predict it. (`copy` repeats a list at a fixed place, which a
    model can learn by position without induction; this task cannot be.) The words are the keys,
    values and variables: every word class that an evaluation task answers with by copying from
    the context (a model warmed up without the variables never learned to copy them, and `vt`,
    whose answers are variables, stayed at 5%). Not in EVAL_TASKS."""
    pool = [w for name in ("keys", "values", "variables") for w in V.word_classes()[name]]
    size = length - 1 - 4  # the context: all but <s>, `? w`, the answer and its `.`
    if size < 8:
        raise TaskError(f"repeat: length {length} is too short (at least 13 tokens)")
    order = [str(pool[i]) for i in rng.permutation(len(pool))]  # fresh words, none repeated by chance
    context, targets, fresh = [], [], 0
    while len(context) < size:
        room = size - len(context)
        if len(context) >= 6 and room >= 3 and rng.random() < 0.5:  # a segment recurs
            k = int(rng.integers(3, min(12, len(context), room) + 1))
            start = int(rng.integers(0, len(context) - k + 1))
            targets += range(len(context) + 1, len(context) + k)
            context += context[start:start + k]
        else:  # fresh words (cycling through the pool once it is spent)
            n = min(int(rng.integers(2, 9)), room)
            context += [order[(fresh + i) % len(order)] for i in range(n)]
            fresh += n
    once = [i for i, w in enumerate(context[:-1]) if context.count(w) == 1]
    ask = once[int(rng.integers(len(once)))] if once else size - 2
    return context, [(V.QUERY, context[ask])], [(context[ask + 1],)], tuple(targets)


TASKS: dict[str, Callable[..., Any]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "mqar": mqar,
    "vt": vt,
    "cwe": cwe,
    "copy": copy,
    "echo": echo,
    "repeat": repeat,
}
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
# the evaluation suite (RULER's categories); "copy", "echo" and "repeat" are training warm-ups only
EVAL_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "mqar", "vt", "cwe")


def _task_id(name: str) -> int:
    return list(TASKS).index(name)


def check_task(name: str) -> None:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")


def make_example(task: str, seed: int, length: int, split: str = "eval", **params) -> Example:
    """The example `seed` of `task` at `length` tokens (with its answers), for `split`."""
    check_task(task)
    if split not in SPLITS:
        raise TaskError(f"split={split!r}; use one of {tuple(SPLITS)}")
    if not isinstance(length, (int, np.integer)) or length < 8:
        raise TaskError(f"{task}: length={length!r} must be an integer >= 8")
    rng = np.random.default_rng((_task_id(task), SPLITS[split], int(seed)))
    try:
        context, questions, answers, *targets = TASKS[task](rng, int(length), **params)
    except TypeError as err:
        raise TaskError(f"{task}: bad parameters {params}: {err}") from err
    ex = Example(task, tuple(context), tuple(map(tuple, questions)), tuple(map(tuple, answers)),
                 tuple(sorted({"length": int(length), **params}.items())),
                 tuple(targets[0]) if targets else ())
    assert ex.num_tokens == length, (task, ex.num_tokens, length)
    return ex


def make_examples(task: str, num: int, length: int, split: str = "eval", first_seed: int = 0,
                  **params) -> list[Example]:
    return [make_example(task, first_seed + i, length, split, **params) for i in range(num)]


def mean_ci95(scores) -> tuple[float, float]:
    """Mean and the half-width of a normal 95% interval over examples."""
    x = np.asarray(scores, float)
    if x.size == 0:
        return math.nan, math.nan
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else math.nan
    return float(x.mean()), float(half)
