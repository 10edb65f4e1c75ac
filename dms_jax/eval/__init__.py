"""Synthetic long-context tasks, their evaluation through the KV cache, and scoring.

    tasks     seeded RULER-style task generators and scorers (`make_example`, `score_example`)
    harness   one model x one cache policy on task examples, through `dms_jax.generate`
    suite     `python -m dms_jax.eval`: vanilla, DMS and baselines at equal budgets; table, plots
    scoring   lm-evaluation-harness's `loglikelihood` through the compressed cache
"""
from dms_jax.eval.harness import EvalError, EvalResult, budget_for, evaluate
from dms_jax.eval.scoring import loglikelihood, loglikelihood_text, token_logprobs
from dms_jax.eval.tasks import (NEEDLE_TASKS, TASKS, Example, TaskError, make_example,
                                make_examples, mean_ci95, score_answer, score_example)

__all__ = [
    "EvalError", "EvalResult", "Example", "NEEDLE_TASKS", "TASKS", "TaskError", "budget_for",
    "evaluate", "loglikelihood", "loglikelihood_text", "make_example", "make_examples",
    "mean_ci95", "score_answer", "score_example", "token_logprobs",
]
