"""Pretraining and retrofit corpora made of task examples (pre-tokenised JSONL).

Each line is one document: {"input_ids": [...], "target_mask": [...], "task": name}, the
target mask 1 on the answer tokens, so `train.py` with `data.packing="bin"` trains on the
answers only and never cuts a document from its questions. Lengths and tasks are drawn per
document from a mix, so one batch holds every difficulty (short and long, few and many facts).
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from dms_jax.eval import tasks as T


_VOCABS: dict[int, dict] = {}


def _vocab(tokenizer) -> dict:
    """tokenizer.get_vocab() (rebuilt by transformers on every call), kept per tokenizer."""
    key = id(tokenizer)
    if key not in _VOCABS:
        _VOCABS[key] = tokenizer.get_vocab()
    return _VOCABS[key]


def encode_example(example: T.Example, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids (with <s>) and target flags of the example's training document."""
    words, target = example.document_words()
    vocab = _vocab(tokenizer)
    unk = tokenizer.unk_token_id
    ids = [tokenizer.bos_token_id] + [vocab.get(w, unk) for w in words]
    if unk in ids[1:]:
        bad = sorted({w for w in words if w not in vocab})
        raise T.TaskError(f"the tokenizer does not know the words {bad[:8]}: retrain it "
                          "(dms_jax.eval.tokenizer.save_tokenizer)")
    return ids, [0] + list(target)


def sample_params(rng, task: str, length: int) -> dict:
    """Random difficulty for a training document (few to many facts, any depth)."""
    if task in ("niah_single",):
        return {}
    if task == "niah_multikey":
        return {"num_facts": int(rng.integers(2, 7))}
    if task == "niah_multivalue":
        return {"num_values": int(rng.integers(2, 5))}
    if task == "niah_multiquery":
        n = int(rng.integers(2, 7))
        return {"num_facts": n, "num_queries": int(rng.integers(1, n + 1))}
    if task == "mqar":
        most = max(2, min(32, (length // 2) // 8))
        n = int(rng.integers(2, most + 1))
        return {"num_facts": n, "num_queries": int(rng.integers(max(1, n // 2), n + 1))}
    if task == "vt":
        return {"hops": int(rng.integers(1, 4)), "num_chains": int(rng.integers(1, 3))}
    if task == "cwe":  # one to three common words, up to twice the evaluation's frequency gap
        return {"num_common": int(rng.integers(1, 4)), "boost": float(rng.choice([1.0, 1.5, 2.0]))}
    if task in ("echo", "repeat"):
        return {}
    if task == "copy":
        return {"num_words": int(rng.integers(4, max(5, (length - 6) // 2) + 1))}
    raise T.TaskError(f"no training difficulty for task {task!r}")


def write_corpus(path: str, tokenizer, *, num_docs: int, lengths: Sequence[int],
                 mix: Mapping[str, float], seed: int = 0, split: str = "train") -> str:
    """Write `num_docs` documents to `path` (JSONL, atomically); returns the path.

    lengths: document lengths drawn uniformly; mix: task -> weight. Seeds are split `split` of
    the task generators, document i using seed `seed * 10**7 + i`.
    """
    for task in mix:
        T.check_task(task)
    rng = np.random.default_rng(seed)
    names = list(mix)
    weights = np.asarray([mix[t] for t in names], float)
    weights /= weights.sum()
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        for i in range(num_docs):
            task = names[int(rng.choice(len(names), p=weights))]
            length = int(rng.choice(lengths))
            for attempt in range(20):  # a difficulty that fits the length (short documents)
                params = sample_params(rng, task, length)
                try:
                    example = T.make_example(task, seed * 10**7 + i, length, split, **params)
                    break
                except T.TaskError:
                    if attempt == 19:
                        raise
            ids, target = encode_example(example, tokenizer)
            f.write(json.dumps({"input_ids": ids, "target_mask": target, "task": task}) + "\n")
    os.replace(tmp, path)
    return path
