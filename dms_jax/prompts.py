"""Prompts for generation: text, chat messages or token ids, read from strings, a text file or a
JSONL file and tokenized (with the chat template where asked), and the stop tokens that end a row.

    prompts = read_prompts(tokenizer, jsonl="prompts.jsonl")   # [Prompt(ids=[...], source=...)]
    out = dms_jax.generate(model, [p.ids for p in prompts],
                           stop_tokens=stop_tokens(None, tokenizer, model_dir, vocab_size))

This is the input layer of `infer.py`: bad inputs raise ValueError naming the offending prompt or
line and the fix, in the terms of infer.py's flags (the keyword arguments of `read_prompts` and
`stop_tokens` mirror them: prompt is --prompt, prompt_file --prompt-file, and so on).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Iterator, NamedTuple


@dataclasses.dataclass
class Prompt:
    """One prompt, tokenized."""

    ids: list  # token ids, [T] ints
    source: str  # where it came from, for messages ("--prompt #1", "line 3 of x.jsonl")
    text: str | None = None  # the prompt as given (None for token ids / messages)
    id: Any = None  # the JSONL row's 'id'
    max_new_tokens: int | None = None  # the JSONL row's own limit (None: the caller's)


class PromptInput(NamedTuple):
    """One prompt as given, before tokenization."""

    source: str  # where it came from, for messages
    kind: str  # "text" (a str), "messages" (a list of {'role', 'content'} dicts) or "ids"
    value: Any  # the text, the messages or the token ids (list[int])
    id: Any = None
    max_new_tokens: int | None = None


def parse_ids(text: str, where: str) -> list[int]:
    """'1,2,3' (or '1 2 3') -> [1, 2, 3]; `where` names the input in the error."""
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a list of integers (use 1,2,3)") from None
    if not ids:
        raise ValueError(f"{where} is empty: every prompt needs at least one token")
    return ids


def read_prompts(tokenizer, *, prompt: list[str] | None = None, prompt_file: str | None = None,
                 jsonl: str | None = None, prompt_ids: list[str] | None = None,
                 chat: bool | None = None, default: str | None = None) -> list[Prompt]:
    """The prompts of one source as token ids, read and tokenized (names the offending prompt or line).

    Sources (give at most one): `prompt`, texts; `prompt_file`, a text file holding one prompt
    ('-': stdin); `jsonl`, one JSON object per line (see `read_jsonl`); `prompt_ids`, strings of
    comma-separated token ids. With none, the text `default`. `tokenizer` may be None when every
    prompt is token ids; `chat` as in `encode_prompts`.
    """
    given = [v for v in (prompt, prompt_file, jsonl, prompt_ids) if v is not None]
    if len(given) > 1:
        raise ValueError("give one kind of input: prompt, prompt_file, jsonl or prompt_ids")
    if prompt_ids is not None:
        inputs = [PromptInput(f"--prompt-ids #{n}", "ids", parse_ids(t, f"--prompt-ids #{n}"))
                  for n, t in enumerate(prompt_ids)]
    elif jsonl is not None:
        inputs = list(read_jsonl(jsonl))
    elif prompt_file is not None:
        inputs = [PromptInput(f"--prompt-file {prompt_file}", "text", _read_text(prompt_file))]
    elif prompt is not None:
        inputs = [PromptInput(f"--prompt #{n}" if len(prompt) > 1 else "--prompt", "text", t)
                  for n, t in enumerate(prompt)]
    elif default is not None:
        inputs = [PromptInput("the built-in prompt", "text", default)]
    else:
        raise ValueError("no prompt given: pass prompt, prompt_file, jsonl or prompt_ids")
    return encode_prompts(inputs, tokenizer, chat)


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"--prompt-file {path}: {err.strerror}") from None


def read_jsonl(path: str) -> Iterator[PromptInput]:
    """The prompts of a JSONL file: one object per non-blank line with 'prompt' (text), 'messages'
    (chat: a list of {'role': ..., 'content': ...}) or 'input_ids' (a list of ints); optional 'id'
    and 'max_new_tokens' (an int >= 0). Raises ValueError naming the line at the first bad one."""
    try:
        f = open(os.path.expanduser(path), encoding="utf-8")
    except OSError as err:
        raise ValueError(f"--jsonl {path}: {err.strerror}") from None
    count = 0
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            yield _jsonl_row(line, f"line {number} of {path}")
            count += 1
    if not count:
        raise ValueError(f"--jsonl {path} holds no prompts")


def _jsonl_row(line: str, where: str) -> PromptInput:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt', 'messages' or 'input_ids'")
    max_new = row.get("max_new_tokens")
    if "max_new_tokens" in row and not (isinstance(max_new, int) and max_new >= 0):
        raise ValueError(f"{where}: max_new_tokens={max_new!r} must be an integer >= 0")
    if "input_ids" in row:
        ids = row["input_ids"]
        if not (isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids)):
            raise ValueError(f"{where}: 'input_ids' must be a non-empty list of integers")
        return PromptInput(where, "ids", ids, row.get("id"), max_new)
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of "
                             "{'role': ..., 'content': ...} objects")
        return PromptInput(where, "messages", messages, row.get("id"), max_new)
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        return PromptInput(where, "text", row["prompt"], row.get("id"), max_new)
    raise ValueError(f"{where} has none of 'prompt', 'messages', 'input_ids' (keys: {sorted(row)})")


def encode_prompts(inputs: list[PromptInput], tokenizer, chat: bool | None = None) -> list[Prompt]:
    """Tokenize `inputs`. Text goes through the tokenizer's chat template (as one user message)
    when `chat` is True, or when it is None and the tokenizer has a template; 'messages' need the
    template. `tokenizer` (a transformers tokenizer) may be None when every input is token ids."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    use_chat = bool(template) if chat is None else chat
    if chat and not template:
        raise ValueError("--chat: the tokenizer has no chat template; drop --chat or give "
                         "--tokenizer DIR with one")
    prompts = []
    for source, kind, value, id_, max_new_tokens in inputs:
        text = None
        if kind == "ids":
            ids = value
        else:
            if tokenizer is None:
                raise ValueError(f"{source}: the model has no tokenizer (no tokenizer.json ...), so "
                                 "text cannot be encoded; pass token ids with --prompt-ids 1,2,3 (or "
                                 "'input_ids' in --jsonl), or a tokenizer with --tokenizer DIR")
            if kind == "messages":
                if not use_chat:
                    raise ValueError(f"{source} has 'messages' but " + (
                        "--no-chat was given" if chat is False else "the tokenizer has no chat template")
                        + "; give 'prompt' (plain text) instead")
                messages = value
            else:
                if not value.strip():
                    raise ValueError(f"{source} is empty: give some text to continue")
                text = value
                messages = [{"role": "user", "content": value}] if use_chat else None
            if messages is not None:
                rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                         tokenize=False)
                ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(value)["input_ids"]
        if not ids:
            raise ValueError(f"{source} is empty after tokenization")
        prompts.append(Prompt([int(t) for t in ids], source, text, id_, max_new_tokens))
    return prompts


# ----------------------------------------------------------------------------------------------
# stop tokens


def stop_tokens(stop: list[str] | None, tokenizer, model_dir: str | None, vocab_size: int) -> list[int]:
    """The ids of `stop` (each a token id or a single token's string); with none, the defaults
    (`default_stop_tokens`). Raises ValueError for a string of several tokens or an id outside
    [0, vocab_size)."""
    if not stop:
        return default_stop_tokens(tokenizer, model_dir, vocab_size)
    ids = []
    for item in stop:
        if item.lstrip("-").isdigit():
            token = int(item)
        elif tokenizer is None:
            raise ValueError(f"--stop {item!r}: the model has no tokenizer; give the token's id")
        else:
            token = tokenizer.convert_tokens_to_ids(item) if item in tokenizer.get_vocab() else None
            if token is None:
                encoded = tokenizer(item, add_special_tokens=False)["input_ids"]
                if len(encoded) != 1:
                    raise ValueError(f"--stop {item!r} is {len(encoded)} tokens {encoded}; give a "
                                     "single token (or its id)")
                token = encoded[0]
        if not 0 <= token < vocab_size:
            raise ValueError(f"--stop {item}: token id {token} is outside the model's vocabulary "
                             f"[0, {vocab_size})")
        ids.append(int(token))
    return ids


def default_stop_tokens(tokenizer, model_dir: str | None, vocab_size: int) -> list[int]:
    """The tokenizer's eos and `model_dir`/generation_config.json's eos_token_id (an id or a list),
    sorted, those outside [0, vocab_size) dropped."""
    found = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    path = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if path and os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        found += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return sorted({int(t) for t in found if 0 <= int(t) < vocab_size})
