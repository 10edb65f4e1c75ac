"""A word-level tokenizer for the synthetic tasks, trained with `tokenizers` on task text.

One token per word (words are split on whitespace only, so `?`, `.` and `=` stand alone because
the task formats space them), `<s>` prepended to every encoding, `<unk>` for a word outside the
vocabulary. Saved as a Hugging Face fast tokenizer (`tokenizer.json` + configs), so
`dms_jax.load_tokenizer` and `transformers.AutoTokenizer` both load it.
"""
from __future__ import annotations

import os

from dms_jax.eval import tasks as T
from dms_jax.eval import vocab as V


def corpus(num_per_task: int = 20, length: int = 256, seed: int = 0):
    """Training text for the tokenizer: examples of every task (train split) and one line
    listing the whole inventory, so rare words (an unasked key) are never left out."""
    yield " ".join(V.all_words()[len(V.SPECIAL_TOKENS):])
    for task in T.TASKS:
        for i in range(num_per_task):
            words, _ = T.make_example(task, seed + i, length, split="train").document_words()
            yield " ".join(words)


def train_tokenizer(num_per_task: int = 20):
    """A `transformers.PreTrainedTokenizerFast` trained on `corpus()`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=V.UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(V.SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator(corpus(num_per_task), trainer=trainer)
    missing = [w for w in V.all_words() if tok.token_to_id(w) is None]
    if missing:  # cannot happen with the inventory line; a clear failure if the classes change
        raise RuntimeError(f"the trained tokenizer misses {len(missing)} words: {missing[:10]}")
    bos = tok.token_to_id(V.BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{V.BOS} $A", pair=f"{V.BOS} $A $B",
                                                       special_tokens=[(V.BOS, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=V.BOS, eos_token=V.EOS,
                                   pad_token=V.PAD, unk_token=V.UNK, clean_up_tokenization_spaces=False)


def save_tokenizer(out_dir: str, num_per_task: int = 20):
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = train_tokenizer(num_per_task)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
