"""Evaluate one model with one cache policy on task examples, through `dms_jax.generate`.

    result = evaluate(model, tokenizer, examples, policy="dms", capacity=96)
    result.accuracy["niah_single"]          # (mean, half-width of the 95% interval)
    result.compression_ratio, result.kv_reads, result.kept_fraction

Every example is a conversation on one KV cache, batched: the first turn's prompt is `<s>`, the
context and the first question; each further question is a continuation turn on the same cache
(`generate(..., state=previous.state)`) whose prompt is the question's words, so the model's own
earlier answers stay in its context. Decoding is greedy and stops at the `.` token or after
`max_answer_tokens`. Everything goes through the real cache: the policy evicts during prefill and
decode, and the cache figures come from its counters (`dms_jax.stats.GenerateStats`).

Cache sizes (the caller decides, nothing is guessed):
  * `full`: every token (capacity = the longest conversation);
  * `dms`: strict, overflow is an error (`CacheOverflowError`), never a result. Give `capacity`
    (slots per layer, row and KV head) large enough that no head ever drops a token, e.g. the
    retrofit's measured held maximum with a margin, or the `max_peak_held` this harness reports
    for a run with more room; without `capacity` or `target_cr` a DMS cache holds the whole
    conversation (it cannot overflow; its held and peak figures are still what DMS keeps);
  * a baseline (`streaming`, `h2o`, `tova`, `snapkv`): `budget` held tokens per KV head, e.g.
    `budget_for(dms_result)` (= `dms_jax.policies.budget_from_stats`) to compare at the held-token
    budget of a DMS run. A budget below the policy's minimum is refused before any compute.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from types import SimpleNamespace
from typing import Sequence

import jax
import numpy as np

import dms_jax
from dms_jax.cache import CacheOverflowError
from dms_jax.eval import tasks as T
from dms_jax.eval import vocab as V
from dms_jax.policies import POLICY_TYPES, budget_from_stats, get_policy

POLICIES = tuple(POLICY_TYPES)  # the policy registry's names
BASELINES = tuple(n for n in POLICY_TYPES if n not in ("full", "dms"))  # the training-free ones


EVAL_CHUNK = 16  # prefill chunk of an evaluation: the baselines evict every 16 tokens


class EvalError(ValueError):
    """Bad input to an evaluation (the message names the value and the fix)."""


@dataclasses.dataclass
class EvalResult:
    """One method on a list of examples. Cache figures are per sequence (a whole conversation),
    averaged over the examples; held and kept figures are taken at the end of each conversation."""

    method: str
    policy: str
    budget: int | None
    capacity: int  # slots per (layer, row, KV head) the caches were allocated with
    tasks: list[str]  # in order of first appearance
    scores: dict[str, list[float]]  # task -> per-example score (score_example)
    accuracy: dict[str, tuple[float, float]]  # task -> (mean, 95% half-width)
    mean: tuple[float, float]  # over all examples (= the mean over tasks for equal counts)
    compression_ratio: float  # seen / held, as 1 / mean(held / seen) over layers, rows, heads
    held_tokens_per_head: float  # mean over layers, rows and KV heads of the tokens held
    max_peak_held: int | None  # most tokens any (layer, row, KV head) held at any step
    peak_kv_bytes: float  # per sequence: sum over (layer, KV head) of its peak K + V bytes
    full_kv_bytes: float  # per sequence: what a full cache holds for the same tokens
    kv_reads_prefill: float  # per sequence: keys read by prompt queries (layers, KV heads)
    kv_reads_decode: float  # per sequence: keys read by decode queries
    overflow: int  # tokens dropped for lack of slots, all sequences (0 in a strict run)
    kept_fraction: np.ndarray  # [L, Hkv] mean over sequences of held / seen
    transcripts: list[dict]  # per example: task, answers (text), generated ids, score
    held_tokens: np.ndarray = dataclasses.field(repr=False)  # [L, N x samples, Hkv] at the end
    seconds: float = 0.0
    samples: int = 1  # conversations sampled per example (the answers are their majority vote)
    temperature: float = 0.0

    @property
    def kv_reads(self) -> float:
        """Keys read per sequence (one sampled conversation)."""
        return self.kv_reads_prefill + self.kv_reads_decode

    @property
    def kv_reads_per_example(self) -> float:
        """Keys read to answer one example: every sampled conversation's."""
        return self.samples * self.kv_reads

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name != "held_tokens"}
        d["kept_fraction"] = np.asarray(self.kept_fraction).tolist()
        d["accuracy"] = {k: list(v) for k, v in self.accuracy.items()}
        d["mean"] = list(self.mean)
        d["kv_reads"] = self.kv_reads
        d["kv_reads_per_example"] = self.kv_reads_per_example
        return _jsonable(d)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def budget_for(result: EvalResult) -> int:
    """The baseline budget that matches a finished run at equal held tokens per head
    (`dms_jax.policies.budget_from_stats` over every sequence of the run)."""
    return budget_from_stats(SimpleNamespace(held_tokens=result.held_tokens))


# ----------------------------------------------------------------------------- checks


def check_method(policy: str, *, budget=None, capacity=None, target_cr=None, policy_params=None,
                 model=None) -> None:
    """Raise EvalError for a method that cannot run, before anything is computed."""
    if policy not in POLICIES:
        raise EvalError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
    try:
        pol = get_policy(policy, **(policy_params or {}))
    except ValueError as err:
        raise EvalError(str(err)) from err
    if policy in BASELINES:
        if budget is None:
            raise EvalError(f"policy {policy!r} evicts down to a budget: pass budget= (held "
                            "tokens per KV head; budget_for(dms_result) matches a DMS run)")
        try:
            pol.check_budget(budget)
        except ValueError as err:
            raise EvalError(str(err)) from err
    elif budget is not None:
        raise EvalError(f"budget={budget} is for the baselines {BASELINES}; policy {policy!r} "
                        "takes capacity= (slots per head)")
    if target_cr is not None and not (isinstance(target_cr, (int, float)) and target_cr >= 1):
        raise EvalError(f"target_cr={target_cr!r} must be a number >= 1 (seen / held)")
    if capacity is not None and not (isinstance(capacity, (int, np.integer)) and capacity >= 1):
        raise EvalError(f"capacity={capacity!r} must be a positive integer (slots per head)")
    if policy == "dms" and model is not None and model.config.dms is None:
        raise EvalError("policy 'dms' needs a DMS model (a retrofit export, whose config.json "
                        "has a 'dms' block); evaluate this model with policy='full'")


def word_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Token ids of task words (one token per word), an error naming unknown words."""
    ids = tokenizer.convert_tokens_to_ids(list(words))
    unk = tokenizer.unk_token_id
    bad = sorted({w for w, i in zip(words, ids) if i is None or (i == unk and w != V.UNK)})
    if bad:
        raise EvalError(f"the tokenizer does not know the task words {bad[:8]}: use the tasks' "
                        "tokenizer (dms_jax.eval.tokenizer.save_tokenizer) for the model")
    return [int(i) for i in ids]


def encode_turns(example: T.Example, tokenizer) -> list[list[int]]:
    """The prompt of each turn: `<s>` + context + first question, then each further question."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise EvalError("the tokenizer has no <s> (bos) token; use the tasks' tokenizer")
    first = [int(bos)] + word_ids(tokenizer, example.context + example.questions[0])
    return [first] + [word_ids(tokenizer, q) for q in example.questions[1:]]


def default_max_answer_tokens(examples: Sequence[T.Example]) -> int:
    """Room for the longest reference answer, its `.`, and 2 tokens of slack."""
    return max(len(a) for ex in examples for a in ex.answers) + 3


# ----------------------------------------------------------------------------- evaluation


def majority(texts: Sequence[str]) -> str:
    """The most frequent answer; among equally frequent ones, the one sampled first."""
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)  # max keeps the first of equal counts (insertion order)


def evaluate(model, tokenizer, examples: Sequence[T.Example], *, policy="full", budget=None,
             target_cr=None, capacity=None, policy_params=None, batch_size=16,
             max_answer_tokens=None, method=None, chunk_size=None, progress=True, samples=1,
             temperature=0.0, seed=0) -> EvalResult:
    """Score `model` on `examples` with one cache policy (see the module docstring).

    policy: "full" | "dms" | "streaming" | "h2o" | "tova" | "snapkv"; policy_params: the
    policy's parameters (`dms_jax.policies.get_policy(name, **params)`, e.g. snapkv's
    obs_window). budget (baselines), capacity (dms; any policy), target_cr (dms without a
    capacity: generate sizes the cache for that CR, and overflow is still an error).
    batch_size: conversations per `generate` call (examples with the same number of questions
    share a batch). max_answer_tokens: the most tokens per answer (default: the longest
    reference answer + its `.` + 2). method: a label for the result (default: the policy).
    chunk_size: the prefill chunk (default EVAL_CHUNK); the baselines evict after each chunk, so
    it bounds how much of the prompt they read before evicting (SnapKV compresses after the whole
    prompt by design).
    samples, temperature, seed: each example's conversation is sampled `samples` times at
    `temperature` (0: greedy, the default; samples > 1 needs temperature > 0) from PRNG seed
    `seed`, and each question is scored on the majority answer of the samples (`majority`). The
    cache figures stay per sampled conversation; `EvalResult.kv_reads_per_example` counts every
    sample's reads (what a majority vote spends, for comparisons at equal KV reads).
    """
    chunk_size = EVAL_CHUNK if chunk_size is None else chunk_size
    if not examples:
        raise EvalError("no examples to evaluate")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise EvalError(f"batch_size={batch_size!r} must be a positive integer")
    if not (isinstance(samples, (int, np.integer)) and samples >= 1):
        raise EvalError(f"samples={samples!r} must be a positive integer (conversations per example)")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise EvalError(f"temperature={temperature!r} must be a number >= 0 (0: greedy)")
    if samples > 1 and temperature == 0:
        raise EvalError(f"samples={samples} at temperature 0 would draw the greedy answer "
                        f"{samples} times: pass temperature > 0 for a majority vote")
    check_method(policy, budget=budget, capacity=capacity, target_cr=target_cr,
                 policy_params=policy_params, model=model)
    if max_answer_tokens is None:
        max_answer_tokens = default_max_answer_tokens(examples)
    if not (isinstance(max_answer_tokens, (int, np.integer)) and max_answer_tokens >= 1):
        raise EvalError(f"max_answer_tokens={max_answer_tokens!r} must be a positive integer")
    stop = word_ids(tokenizer, [V.END])[0]
    turns = [encode_turns(ex, tokenizer) for ex in examples]
    # one cache shape for every batch: room for the longest conversation
    max_len = max(sum(len(t) for t in ts) + len(ts) * max_answer_tokens for ts in turns)
    if capacity is None and policy == "dms" and target_cr is None:
        capacity = max_len  # holds every token: cannot overflow
    pol = get_policy(policy, **(policy_params or {}))
    method = method or policy

    # conversation c is sample c % samples of example c // samples; conversations with the same
    # number of turns share batches
    convs = len(examples) * samples
    groups = defaultdict(list)
    for c in range(convs):
        groups[len(turns[c // samples])].append(c)
    batches = [idx[s:s + batch_size] for idx in groups.values()
               for s in range(0, len(idx), batch_size)]
    sampling = {} if temperature == 0 else dict(temperature=float(temperature))
    root = jax.random.key(seed)

    answers: list[list[list[int]]] = [[] for _ in range(convs)]
    held, seen, peak_bytes, full_bytes = [], [], 0.0, 0.0
    reads_prefill = reads_decode = 0.0
    overflow, max_peak, alloc = 0, None, None
    t0 = time.perf_counter()
    bar = _progress(len(batches), method) if progress else None
    for b, rows in enumerate(batches):
        state = None
        for k in range(len(turns[rows[0] // samples])):
            prompts = [turns[c // samples][k] for c in rows]
            kw = dict(max_new_tokens=max_answer_tokens, stop_tokens=[stop], strict=True,
                      **sampling)
            if sampling:
                kw["key"] = jax.random.fold_in(jax.random.fold_in(root, b), k)
            if state is None:
                kw.update(policy=pol, max_len=max_len, budget=budget, capacity=capacity,
                          target_cr=target_cr, chunk_size=chunk_size)
            else:
                kw.update(state=state)
            try:
                out = dms_jax.generate(model, prompts, **kw)
            except CacheOverflowError as err:
                raise CacheOverflowError(
                    f"{method}: {err}. A DMS evaluation must never drop a token: raise its "
                    "capacity (e.g. above the retrofit's measured held maximum, or the "
                    "max_peak_held of a run with capacity=None)") from err
            state = out.state
            for i, seq in zip(rows, out.sequences()):
                answers[i].append(seq)
            reads_prefill += out.stats.kv_reads_prefill
            reads_decode += out.stats.kv_reads_decode
        stats = out.stats  # the cache's counters (held, peak, overflow) cover every turn
        held.append(np.asarray(stats.held_tokens))
        seen.append(np.asarray(stats.seen_tokens))
        peak_bytes += stats.peak_kv_bytes
        full_bytes += stats.full_kv_bytes
        overflow += int(stats.overflow)
        alloc = stats.capacity
        batch_peak = _max_peak_held(state)
        if batch_peak is not None:
            max_peak = batch_peak if max_peak is None else max(max_peak, batch_peak)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    # per example order
    order = np.concatenate(batches)
    held_all = np.concatenate(held, axis=1)[:, np.argsort(order)]  # [L, N, Hkv]
    seen_all = np.concatenate(seen)[np.argsort(order)]  # [N]
    ratio = held_all / np.maximum(seen_all, 1)[None, :, None]
    n = convs  # the cache figures are per sampled conversation

    scores: dict[str, list[float]] = {}
    transcripts = []
    for e, ex in enumerate(examples):
        drawn = answers[e * samples:(e + 1) * samples]  # [samples][turns] ids
        texts_by_sample = [[" ".join(tokenizer.convert_ids_to_tokens(a)) for a in ans]
                           for ans in drawn]
        texts = [majority(turn) for turn in zip(*texts_by_sample)]
        s = T.score_example(ex, texts)
        scores.setdefault(ex.task, []).append(s)
        record = {"task": ex.task, "params": dict(ex.params), "answers": texts,
                  "references": [" ".join(a) for a in ex.answers],
                  "generated_ids": drawn[0] if samples == 1 else drawn, "score": s}
        if samples > 1:
            record["sampled_answers"] = texts_by_sample
        transcripts.append(record)
    all_scores = [s for ex_scores in scores.values() for s in ex_scores]
    return EvalResult(
        method=method, policy=policy, budget=budget, capacity=int(alloc), tasks=list(scores),
        scores=scores, accuracy={t: T.mean_ci95(v) for t, v in scores.items()},
        mean=T.mean_ci95(all_scores),
        compression_ratio=float(1.0 / max(ratio.mean(), 1e-12)),
        held_tokens_per_head=float(held_all.mean()), max_peak_held=max_peak,
        peak_kv_bytes=peak_bytes / n, full_kv_bytes=full_bytes / n,
        kv_reads_prefill=reads_prefill / n, kv_reads_decode=reads_decode / n,
        overflow=overflow, kept_fraction=ratio.mean(axis=1), transcripts=transcripts,
        held_tokens=held_all, seconds=time.perf_counter() - t0, samples=int(samples),
        temperature=float(temperature))


def _max_peak_held(state) -> int | None:
    """The most tokens any (layer, row, KV head) held at any step, read from the final cache's
    counters (None if the cache does not keep them)."""
    try:
        return int(max(int(np.asarray(c.peak_held).max()) for c in state.cache))
    except (AttributeError, TypeError, ValueError):
        return None


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)
