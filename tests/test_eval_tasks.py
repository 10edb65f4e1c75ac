"""The task generators and scorers of dms_jax.eval.tasks (no model, no JAX compile).

* every task renders at lengths 128 and 255 with exactly that many tokens (<s>, context,
  questions, reference answers), deterministically per (task, seed, split), and the "train" and
  "eval" splits never produce the same example;
* the answers are in the context where they should be (a needle's fact, a chain's assignments,
  the common words' counts), and `depth` places needles;
* scoring follows RULER's string_match_all on whole words (exact match for one-word answers),
  cut at the answer's first `.`; a perfect transcript scores 1;
* too-short lengths, unknown names and bad parameters raise TaskError naming the fix.
"""
import collections
import math

import numpy as np
import pytest

from dms_jax.eval import tasks as T
from dms_jax.eval import vocab as V

LENGTHS = (128, 255)


def perfect(example):
    return [" ".join(a) + " ." for a in example.answers]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(T.TASKS))
def test_every_task_renders_exactly_and_deterministically(task, length):
    for seed in range(3):
        ex = T.make_example(task, seed, length, split="eval")
        words, target = ex.document_words()
        assert ex.num_tokens == length == 1 + len(words)
        assert sum(target) == len(ex.context_targets) + sum(len(a) + 1 for a in ex.answers)
        assert ex == T.make_example(task, seed, length, split="eval")
        assert all(q[0] == V.QUERY for q in ex.questions)
        assert len(ex.questions) == len(ex.answers) >= 1
        assert T.score_example(ex, perfect(ex)) == 1.0
        known = set(V.all_words())
        assert set(words) <= known
    assert T.make_example(task, 0, length) != T.make_example(task, 1, length)


@pytest.mark.parametrize("task", list(T.TASKS))
def test_train_and_eval_splits_are_disjoint(task):
    train = {T.make_example(task, s, 128, split="train").context for s in range(40)}
    held_out = {T.make_example(task, s, 128, split="eval").context for s in range(40)}
    assert len(train) == len(held_out) == 40
    assert not train & held_out


KEYS = set(V.word_classes()["keys"])


def facts_in(context):
    """{key: [values]} of the `K V .` facts in a context (keys are a class of their own)."""
    out = collections.defaultdict(list)
    for i in range(len(context) - 2):
        if context[i] in KEYS and context[i + 2] == V.END:
            out[context[i]].append(context[i + 1])
    return out


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue",
                                  "niah_multiquery", "mqar"])
def test_needle_answers_are_the_facts_of_the_asked_keys(task):
    for seed in range(5):
        ex = T.make_example(task, seed, 255)
        facts = facts_in(ex.context)
        for q, a in zip(ex.questions, ex.answers):
            assert sorted(facts[q[1]]) == sorted(a)
        if task == "niah_multikey":
            assert len(facts) == 4  # one needle, three distractors
        if task == "mqar":
            assert len(ex.questions) == len(facts) // 2 >= 1


def test_needle_depth_places_the_fact():
    start = T.make_example("niah_single", 0, 255, depth=0.0).context
    end = T.make_example("niah_single", 0, 255, depth=1.0).context
    assert start[0] in KEYS
    assert end[-3] in KEYS and end[-1] == V.END


def test_variable_tracking_answer_is_the_chain():
    for seed in range(5):
        ex = T.make_example("vt", seed, 255, hops=3)
        value = ex.questions[0][1]
        assign = {}
        c = ex.context
        for i in range(len(c) - 3):
            if c[i] == V.VAR and c[i + 3] == V.END:  # VAR src dst .
                assign[c[i + 2]] = c[i + 1]
        chain, holder = [], value
        while True:  # follow the assignments forward from the value
            nxt = [name for name, src in assign.items() if src == holder]
            if not nxt:
                break
            chain.append(nxt[0])
            holder = nxt[0]
        assert tuple(chain) == ex.answers[0] and len(chain) == 4


def test_common_words_are_the_most_frequent():
    for seed in range(5):
        ex = T.make_example("cwe", seed, 255)
        end = ex.context.index(V.END)
        counts = collections.Counter(ex.context[1:end])
        common = set(ex.answers[0])
        assert len(common) == 3
        least_common = min(counts[w] for w in common)
        assert all(n <= least_common // 2 for w, n in counts.items() if w not in common)


@pytest.mark.parametrize("length", (63, 255))
def test_repeat_targets_are_recurring_segments_and_the_answer_follows_the_asked_word(length):
    """Each target repeats, two-token-window by window, an earlier stretch of the context (so
    only induction predicts it), and the question asks for what followed a word seen once."""
    for seed in range(20):
        ex = T.make_example("repeat", seed, length, split="train")
        ctx, targets = ex.context, ex.context_targets
        assert targets
        for i in targets:
            earlier = [j for j in range(1, i) if ctx[j - 1] == ctx[i - 1] and ctx[j] == ctx[i]]
            assert earlier, (seed, i)
        (q,), (a,) = ex.questions, ex.answers
        asked = q[1]
        assert ctx[:-1].count(asked) == 1 and a == (ctx[ctx.index(asked) + 1],)


def test_filler_is_varied():
    ctx = T.make_example("niah_single", 0, 255).context
    sentences, cur = [], []
    for w in ctx:
        cur.append(w)
        if w == V.END:
            sentences.append(tuple(cur))
            cur = []
    assert len(set(sentences)) >= 0.9 * len(sentences)


def test_scoring_is_string_match_all_on_whole_words():
    # one reference word: exact match of the answer (up to its first ".")
    assert T.score_answer("12 .", ["12"]) == 1.0
    assert T.score_answer("12", ["12"]) == 1.0  # no "." (ran out of tokens): the words so far
    assert T.score_answer("12 . 13 .", ["12"]) == 1.0  # after "." is not the answer
    assert T.score_answer("13 12 .", ["12"]) == 0.0  # exact match, not containment
    assert T.score_answer("123 .", ["12"]) == 0.0  # whole words, not substrings
    assert T.score_answer(". 12", ["12"]) == 0.0
    # several reference words: the fraction found, in any order, whole words only
    assert T.score_answer("XB XA .", ["XA", "XB"]) == 1.0
    assert T.score_answer("XA ZZ .", ["XA", "XB"]) == 0.5
    assert T.score_answer("XAB .", ["XA", "XB"]) == 0.0
    assert T.score_answer("XA . XB", ["XA", "XB"]) == 0.5
    assert T.score_answer("10 11 12 10 .", ["10", "11", "12"]) == 1.0
    ex = T.make_example("niah_multiquery", 0, 128)
    assert len(ex.questions) == 2
    assert T.score_example(ex, [perfect(ex)[0], "nothing ."]) == 0.5
    with pytest.raises(T.TaskError, match="1 answers for 2 questions"):
        T.score_example(ex, perfect(ex)[:1])


def test_mean_ci95():
    mean, half = T.mean_ci95([1, 0, 1, 0])
    assert mean == 0.5
    assert half == pytest.approx(1.96 * np.std([1, 0, 1, 0], ddof=1) / 2)
    assert T.mean_ci95([1.0])[0] == 1.0 and math.isnan(T.mean_ci95([1.0])[1])
    assert all(math.isnan(x) for x in T.mean_ci95([]))


@pytest.mark.parametrize("task, length, params, match", [
    ("niah_single", 7, {}, "must be an integer >= 8"),
    ("niah_multikey", 12, {}, r"use length >= \d+"),
    ("niah_multiquery", 20, {"num_facts": 6}, r"use length >= \d+"),
    ("vt", 20, {}, r"use length >= \d+"),
    ("cwe", 12, {}, "use a longer length"),
    ("needle", 128, {}, "unknown task 'needle'"),
    ("niah_single", 128, {"depth": 1.5}, r"depth=1.5 must be in \[0, 1\]"),
    ("niah_multikey", 128, {"num_facts": 1}, "num_facts=1 must be >= 2"),
    ("mqar", 128, {"num_queries": 99}, "num_queries=99"),
    ("niah_single", 128, {"colour": 1}, "bad parameters"),
])
def test_bad_input_raises_task_error(task, length, params, match):
    with pytest.raises(T.TaskError, match=match):
        T.make_example(task, 0, length, **params)


def test_short_lengths_name_the_length_needed():
    with pytest.raises(T.TaskError) as err:
        T.make_example("vt", 0, 20)
    need = int(str(err.value).rsplit(">= ", 1)[1].rstrip(")"))
    T.make_example("vt", 0, need)  # exactly the length it named renders (no filler)
    with pytest.raises(T.TaskError, match="split="):
        T.make_example("vt", 0, 128, split="test")
