"""The built-in recall demo: what `python infer.py` runs when it is given no input.

One held-out needle question (`niah_single`, split "eval": never a training document): a fact
`K V .` hidden in generated filler at the recall models' trained length, then `? K`. The
model answers with the value that followed `K`, then `.`; the demo prints the question, the answer
and the expected one. Any model whose tokenizer knows the task words (the shipped recall models,
a `scripts/build_recall_models.py` run's models) gets this prompt; other models get infer.py's
text prompt.
"""
from __future__ import annotations

import dataclasses

from dms_jax.eval import tasks as T
from dms_jax.eval import vocab as V

DEMO_TASK = "niah_single"
DEMO_SEED = 2026  # of the "eval" split
DEMO_LENGTH = 255  # tokens of the whole document (<s>, context, question, answer): the trained length
DEMO_ANSWER_TOKENS = 4  # the value, its `.`, and slack


@dataclasses.dataclass(frozen=True)
class Demo:
    example: T.Example
    ids: list[int]  # the prompt: <s>, the context and the question  [T]
    stop: int  # the id of `.`, which ends an answer
    answer_tokens: int = DEMO_ANSWER_TOKENS  # the most tokens to generate

    @property
    def question(self) -> str:
        return " ".join(self.example.questions[0])

    @property
    def expected(self) -> str:
        return " ".join(self.example.answers[0])

    def answer(self, tokenizer, generated_ids) -> str:
        """The generated words before the closing `.`."""
        words = tokenizer.convert_ids_to_tokens([int(i) for i in generated_ids])
        return " ".join(T.answer_words(" ".join(words)))

    def correct(self, answer: str) -> bool:
        return T.score_answer(answer, self.example.answers[0]) == 1.0

    def report(self, tokenizer, generated_ids) -> str:
        """The lines infer.py prints after the run."""
        answer = self.answer(tokenizer, generated_ids)
        asked = self.example.questions[0][-1]
        at = 1 + self.example.context.index(asked)  # the asked fact's key, after <s>
        return "\n".join([
            f"question: {self.question}   (its fact is at token {at} of {len(self.ids)})",
            f"answer:   {answer or '(nothing)'}",
            f"expected: {self.expected}   ({'correct' if self.correct(answer) else 'wrong'})",
        ])


def knows_tasks(tokenizer) -> bool:
    """Whether `tokenizer` is the tasks' word-level tokenizer (it has every structure word)."""
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    vocab = tokenizer.get_vocab()
    return all(w in vocab for w in (V.QUERY, V.END, V.LIST))


def make_demo(tokenizer, *, seed: int = DEMO_SEED, length: int = DEMO_LENGTH) -> Demo:
    """The demo prompt for `tokenizer` (the tasks' tokenizer)."""
    from dms_jax.eval.harness import encode_turns, word_ids  # imports jax

    example = T.make_example(DEMO_TASK, seed, length, "eval")
    return Demo(example, encode_turns(example, tokenizer)[0], word_ids(tokenizer, [V.END])[0])
