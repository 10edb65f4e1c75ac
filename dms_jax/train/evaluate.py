"""Evaluation during training: held-out task examples scored every `eval.every` steps.

The examples come from `dms_jax.eval.tasks` (split "eval", disjoint from every training seed)
and are scored teacher-forced in one jitted forward: an answer is right when the model's argmax
is right at every answer token. A DMS model is scored in the hard evaluation mode (the eviction
its decisions make), a plain one in the plain forward. Scores go to the metrics as
`eval/<task>` and `eval/mean`, and to the progress bar.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dms_jax.train import optim


@dataclasses.dataclass
class TaskEval:
    tasks: tuple[str, ...]
    input_ids: np.ndarray  # int32 [N, T]
    attention_mask: np.ndarray  # int32 [N, T]
    answer_ids: np.ndarray  # int32 [N, T]: which answer (0-based) position t+1 belongs to, -1: none
    task_of_row: np.ndarray  # int32 [N]
    forward: Any = None


def build_task_eval(eval_cfg, tokenizer, *, seq_len: int) -> TaskEval | None:
    """The fixed evaluation batch of config.eval, or None when eval.every is 0."""
    from dms_jax.eval import corpus, tasks as T

    if not eval_cfg or int(eval_cfg.get("every", 0) or 0) <= 0:
        return None
    if tokenizer is None:
        raise ValueError("eval.every > 0 scores task examples: set data.tokenizer (the tasks' tokenizer)")
    names = tuple(t.strip() for t in str(eval_cfg.get("tasks") or ",".join(T.EVAL_TASKS)).split(",") if t.strip())
    for name in names:
        T.check_task(name)
    length = int(eval_cfg.get("length") or seq_len - 1)  # a document and its EOS fill a row
    if length > seq_len:
        raise ValueError(f"eval.length={length} > train.seq_len={seq_len}")
    num = int(eval_cfg.get("examples") or 16)
    rows, answers, owner, real_lengths = [], [], [], []
    for ti, name in enumerate(names):
        for ex in T.make_examples(name, num, length, split="eval", first_seed=int(eval_cfg.get("seed") or 0)):
            ids, target = corpus.encode_example(ex, tokenizer)
            # number each question's answer (its words and the closing "."): positions t with
            # answer_of[t + 1] = k predict a token of answer k
            answer_of, k, prev = [], -1, 0
            for flag in target:
                if flag and not prev:
                    k += 1
                answer_of.append(k if flag else -1)
                prev = flag
            pad = seq_len - len(ids)
            real_lengths.append(len(ids))
            rows.append(ids + [tokenizer.pad_token_id or 0] * pad)
            answers.append(answer_of[1:] + [-1] * (pad + 1))
            owner.append(ti)
    ids = np.asarray(rows, np.int32)
    attention = (np.arange(seq_len)[None, :] < np.asarray(real_lengths)[:, None]).astype(np.int32)
    return TaskEval(names, ids, attention, np.asarray(answers, np.int32), np.asarray(owner, np.int32))


def make_eval_forward(graphdef, paths, dms_mode: bool):
    def forward(params, input_ids, attention_mask):
        model = optim.merge_model(graphdef, params, paths)
        out = model.forward(input_ids, attention_mask=attention_mask, mode="eval" if dms_mode else "plain",
                            attention_impl="dense")
        return jnp.argmax(out.logits, axis=-1).astype(jnp.int32)

    return jax.jit(forward)


def score(task_eval: TaskEval, params: dict, graphdef, paths, dms_mode: bool, batch: int = 32) -> dict:
    """{"eval/<task>": fraction of answers fully right, ..., "eval/mean": their mean}."""
    if task_eval.forward is None:
        task_eval.forward = make_eval_forward(graphdef, paths, dms_mode)
    ids, mask, answer_of = task_eval.input_ids, task_eval.attention_mask, task_eval.answer_ids
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    n = ids.shape[0]
    per_task: dict[int, list[float]] = {}
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        rows = np.arange(start, stop)
        take = np.concatenate([rows, np.full(batch - len(rows), rows[-1])])  # one compiled shape
        pred = np.asarray(task_eval.forward(params, jnp.asarray(ids[take]), jnp.asarray(mask[take])))
        for j, row in enumerate(rows):
            a = answer_of[row]
            right = pred[j] == targets[row]
            marks = [bool(np.all(right[a == k])) for k in range(int(a.max()) + 1)]
            per_task.setdefault(int(task_eval.task_of_row[row]), []).append(float(np.mean(marks)))
    out = {f"eval/{task_eval.tasks[t]}": float(np.mean(v)) for t, v in sorted(per_task.items())}
    out["eval/mean"] = float(np.mean(list(out.values())))
    return out
