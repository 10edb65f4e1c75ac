"""What generation hands back, made readable: token ids as text (whole, or streamed as they come
without splitting a character) and `GenerateStats` as JSON.

    stream = TextStream(tokenizer, sys.stdout)
    dms_jax.generate(model, [ids], on_tokens=lambda new: stream.feed(new[0]), decode_segment=16)
    stream.finish()
"""
from __future__ import annotations

import dataclasses

import numpy as np


def render(tokenizer, ids) -> str:
    """Token ids -> text (special tokens skipped); without a tokenizer, the ids comma-separated."""
    if tokenizer is None:
        return ",".join(str(int(t)) for t in ids)
    return tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """Incremental detokenization of one row: prints only complete characters. The tokens are
    decoded again from the last printed newline on, so each token costs a bounded decode.

    `out` is a text stream (write / flush); `feed` takes a row's new token ids ([N] ints, negative
    ids, a finished row's padding, skipped); `finish` prints the rest and a newline.
    """

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []  # since the last newline (all of them for token-id output)
        self.printed = ""  # their text, as printed

    def feed(self, ids):
        self.ids += [int(t) for t in ids if t >= 0]
        text = render(self.tokenizer, self.ids)
        if self.tokenizer is not None and text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for its next bytes
        self._emit(text)
        if self.tokenizer is not None and text.endswith("\n"):
            self.ids, self.printed = [], ""

    def finish(self):
        self._emit(render(self.tokenizer, self.ids))
        self.out.write("\n")
        self.out.flush()

    def _emit(self, text):
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def stats_to_json(stats) -> dict:
    """A `GenerateStats` as a JSON-ready dict: every field (numpy arrays as lists, numpy scalars
    as Python numbers) and decode_tokens_per_s."""
    out = {}
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        out[field.name] = value.tolist() if isinstance(value, np.ndarray) else (
            value.item() if isinstance(value, np.generic) else value)
    out["decode_tokens_per_s"] = float(stats.decode_tokens_per_s)
    return out
