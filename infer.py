"""Generate with a (DMS) model over the fixed-shape KV cache: a thin CLI over `dms_jax.generate`.

    python infer.py                                     # the shipped DMS 8x model on a needle question
    python infer.py --model vanilla                     # the same question, the vanilla model, full cache
    python infer.py --model runs/q8/export --prompt "Why is the sky blue?" --max-new-tokens 256
    python infer.py --model Qwen/Qwen3-8B --jsonl prompts.jsonl --output-jsonl out.jsonl
    python infer.py --model DIR --prompt-ids 1,2,3      # a model without a tokenizer: token ids
    python infer.py --policy full                       # the uncompressed baseline
    python infer.py --policy h2o --budget 256 --policy-arg recent=32
    python infer.py --train-config configs/tiny.py      # a train.py run: its export or checkpoint

--model takes a Hugging Face model directory (a train.py export included), a hub id, a train.py
output directory (its export/ when present), or a train.py checkpoint directory (or one step of
it) together with --train-config, the config file the run was trained with: the newest complete
checkpoint is restored over the run's base model. Prints the generated text (streamed for one
prompt) and a table of cache statistics; progress goes to stderr (bars on a terminal, else a line
every few seconds). Bad flags or inputs print `error: ...` and exit with code 2 before any model
compute; so does a cache that would not fit in memory. The settings are decided by the library's
one plan (`dms_jax.plan.plan_inference`): the flags are checked against it, and the input line
shows what it decided.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from typing import Any

# transformers prints "PyTorch was not found ..." at import on a JAX-only install: an advisory
# message, not an error (set before anything imports transformers; a user's setting wins)
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_DECODE_SEGMENT = 16
LOG_EVERY_S = 5.0  # without a terminal: a progress line at most this often

# The built-in long prompt (about 1.8k tokens with the default model's byte-level tokenizer).
DEFAULT_PROMPT = """\
The harbour town of Saltmere kept its records in a narrow stone building at the end of the quay, \
and for most of its history nobody thought much about them. Fishing licences, births, the price of \
salt, the names of ships that left and the shorter list of ships that came back: everything went \
into ledgers, and the ledgers went onto shelves. When the shelves were full, a carpenter built more. \
When the room was full, the town bought the chandlery next door and knocked a hole through the wall.

The trouble began when the last archivist retired and a young woman named Ilse Marren took over. \
She found that the building held about forty thousand ledgers, that roughly a tenth of them had \
ever been opened a second time, and that finding anything took most of a day. People who came \
with a question usually went home without an answer, not because the answer was missing but \
because it was buried under everything else. The archive remembered all of it and could use \
almost none of it.

Ilse began by watching what people actually asked for. Most questions were about the recent past: \
last winter's catch, the current owner of a boat, the fee agreed at the most recent council \
meeting. A smaller number reached further back, and those almost always pointed at a handful of \
documents that mattered far more than the rest: the founding charter, the boundary surveys, the \
agreement with the salt merchants, the register of the great storm. Everything else was read \
once, when it was written, and never again.

So she made a rule. Every new record would stay on the front desk for a season, where anyone \
could consult it. At the end of the season she would decide, record by record, whether it would \
be needed again. If it would, it went to the reading room, where the shelves were few and every \
item was catalogued by hand. If it would not, it was copied into a one-line summary in the \
yearly digest and the original went to the cellar, which was damp and which nobody visited. The \
decision was not made at the moment a record arrived, when she could not yet tell what it would \
turn out to mean, but after it had spent a season in plain sight.

The council objected at first. What if she guessed wrong, and some dull invoice turned out, \
years later, to settle a dispute? Ilse answered that she would sometimes guess wrong, but that the \
old system guessed wrong every day, because a record nobody can find is as good as lost. After \
two years the reading room held only one record in eight, and it answered nearly every question \
that came through the door.

When a scholar from the capital asked how she had made so small a collection so useful, she said \
that an archive is not measured by how much it keeps but by how quickly it can put the right page \
in front of the person who needs it, and that the hardest part had been learning to wait a season \
before deciding what to forget.

Summarise in one paragraph what Ilse Marren learned about keeping records, and explain why she \
waited a season before deciding what to keep."""


class CLIError(ValueError):
    """A bad flag or input: printed as `error: ...`, exit code 2."""


# ----------------------------------------------------------------------------------------------
# flags


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is unset (None / False / []) or the help names it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from dms_jax.eval.demo import DEMO_ANSWER_TOKENS
    from dms_jax.policies import POLICY_TYPES

    p = argparse.ArgumentParser(
        prog="infer.py", description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 done, 1 the run failed (e.g. --strict and the cache overflowed), "
               "2 bad flags or inputs (reported before any model compute).",
        formatter_class=_HelpFormatter, allow_abbrev=False)
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="PATH", default=None,
                   help="HF model directory (a train.py export included), hub id, train.py output "
                        "directory, or train.py checkpoint directory (with --train-config); "
                        "dms8x / vanilla: the shipped recall models; default: dms8x (or the "
                        "--train-config run's)")
    m.add_argument("--train-config", default=None, metavar="FILE",
                   help="the config file (configs/*.py) a train.py run used: needed to restore its "
                        "checkpoints over the base model")
    m.add_argument("--base-model", default=None, metavar="DIR",
                   help="with --train-config: the base model, overriding the config's model.path")
    m.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer directory (default: the model's)")
    m.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32, or the train config's)")

    i = p.add_argument_group("input (one kind; default: the built-in long prompt)")
    i.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt (repeat for a batch)")
    i.add_argument("--prompt-file", default=None, metavar="PATH",
                   help="a text file holding one prompt ('-': stdin)")
    i.add_argument("--jsonl", default=None, metavar="PATH",
                   help="a batch: one JSON object per line with 'prompt' (text), 'messages' (chat) "
                        "or 'input_ids'; optional 'id' and 'max_new_tokens'")
    i.add_argument("--prompt-ids", action="append", default=None, metavar="IDS",
                   help="a prompt as comma-separated token ids (repeat for a batch); for models "
                        "without a tokenizer")
    i.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the tokenizer's chat template (default: when the "
                        "tokenizer has one)")

    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", metavar="N", type=int, default=None,
                   help=f"tokens to generate per prompt (default {DEFAULT_MAX_NEW_TOKENS}; the "
                        f"built-in needle question: {DEMO_ANSWER_TOKENS})")
    g.add_argument("--temperature", metavar="T", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", metavar="K", type=int, default=0,
                   help="keep the k most likely tokens (0: all)")
    g.add_argument("--top-p", metavar="P", type=float, default=1.0,
                   help="nucleus sampling mass in (0, 1]")
    g.add_argument("--seed", metavar="N", type=int, default=0, help="PRNG seed for sampling")
    g.add_argument("--stop", action="append", default=None, metavar="TOKEN",
                   help="a stop token: its id or its string (repeatable; default: the "
                        "tokenizer's / generation_config's end-of-sequence tokens)")
    g.add_argument("--no-stop", action="store_true",
                   help="no stop tokens: always generate --max-new-tokens")

    c = p.add_argument_group("KV cache")
    c.add_argument("--policy", metavar="NAME", default=None,
                   help=f"eviction policy: one of {', '.join(POLICY_TYPES)} (default: dms for a "
                        "DMS model, else full)")
    c.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the policy (repeatable), e.g. sinks=4 (streaming), "
                        "recent=32 (h2o), obs_window=64 (snapkv); passed to "
                        "dms_jax.policies.get_policy, which lists a policy's parameters when a "
                        "key is wrong")
    c.add_argument("--window", metavar="W", type=int, default=None,
                   help="DMS delayed-eviction window (default: the model's)")
    c.add_argument("--target-cr", metavar="CR", type=float, default=None,
                   help="compression ratio the dms cache is sized for (>= 1; default: the "
                        "model's recorded dms.target_cr, else 8)")
    c.add_argument("--margin", metavar="F", type=float, default=None,
                   help="extra fraction of the expected retained tokens in the dms capacity "
                        "(default 0.5 per head for slots, 0.1 of the pool for pages)")
    c.add_argument("--layout", choices=("slots", "paged"), default="slots",
                   help="cache layout: fixed slots per head, or a ring of the window per head "
                        "and one pool of pages per layer (full and dms)")
    c.add_argument("--page-size", metavar="N", type=int, default=64,
                   help="tokens per page of the paged layout")
    c.add_argument("--capacity", metavar="N", type=int, default=None,
                   help="slots per (layer, row, KV head), overriding --target-cr")
    c.add_argument("--budget", metavar="N", type=int, default=None,
                   help="held tokens per (layer, row, KV head): required by the baselines "
                        "(streaming, h2o, tova, snapkv)")
    c.add_argument("--max-len", metavar="N", type=int, default=None,
                   help="tokens per row the cache must take (default: longest prompt + "
                        "--max-new-tokens; the limit is the model's max_position_embeddings)")
    c.add_argument("--chunk-size", metavar="N", type=int, default=512,
                   help="prefill chunk (memory ~ cache + chunk)")
    c.add_argument("--strict", action="store_true",
                   help="fail (exit 1) if any head dropped a token for lack of slots")

    o = p.add_argument_group("output")
    o.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print the text as it is generated (one prompt; a batch prints at the end)")
    o.add_argument("--decode-segment", metavar="N", type=_positive_int,
                   default=DEFAULT_DECODE_SEGMENT,
                   help="tokens per jitted decode call when streaming or showing progress")
    o.add_argument("--stats-json", default=None, metavar="PATH",
                   help="write the cache statistics as JSON (arrays as lists)")
    o.add_argument("--output-jsonl", default=None, metavar="PATH",
                   help="write one JSON object per prompt: id, source, prompt_tokens, tokens "
                        "(generated ids), text, stopped (ended on a stop token)")
    o.add_argument("--quiet", action="store_true",
                   help="only the generated text: no progress bars, info lines or stats table")
    return p


def parse_policy_args(items) -> dict[str, Any]:
    """['recent=32', 'sinks=4'] -> {'recent': 32, 'sinks': 4} (ints, floats, booleans, strings)."""
    params = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--policy-arg {item!r}: expected KEY=VALUE, e.g. --policy-arg recent=32")
        params[key.strip().replace("-", "_")] = _parse_value(text.strip())
    return params


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    return text


def _flag(field, value) -> str:
    return f"--{field.replace('_', '-')} {value}"


def check_flags(args) -> None:
    """Everything checkable without the model (names the flag, the value and the fix): the
    plan's and the sampler's own checks, spelled as flags, and the CLI's."""
    from dms_jax.plan import PlanError, check_settings
    from dms_jax.sampling import check_sampling

    sources = [name for name, value in (("--prompt", args.prompt), ("--prompt-file", args.prompt_file),
                                        ("--jsonl", args.jsonl), ("--prompt-ids", args.prompt_ids))
               if value is not None]
    if len(sources) > 1:
        raise CLIError(f"give one kind of input, not {' and '.join(sources)}")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, spell=_flag)
    except ValueError as err:
        raise CLIError(str(err)) from None
    try:
        check_settings(window=args.window, target_cr=args.target_cr,
                       margin=0.5 if args.margin is None else args.margin,
                       capacity=args.capacity, budget=args.budget, max_len=args.max_len,
                       chunk_size=args.chunk_size)
    except PlanError as err:
        raise CLIError(err.flag_message) from None
    if args.no_stop and args.stop:
        raise CLIError("--stop and --no-stop contradict each other; give one")
    if args.base_model and not args.train_config:
        raise CLIError("--base-model overrides the model.path of --train-config; give both")
    for flag, path in (("--stats-json", args.stats_json), ("--output-jsonl", args.output_jsonl)):
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(path))) if path else None
        if folder and not os.path.isdir(folder):
            raise CLIError(f"{flag} {path}: the directory {folder} does not exist")


# ----------------------------------------------------------------------------------------------
# checks against the model


def get_named_policy(args, name=None):
    """The Policy of --policy (or `name`) and --policy-arg (no model needed: unknown names fail
    early)."""
    from dms_jax.policies import get_policy

    name = args.policy if name is None else name
    params = parse_policy_args(args.policy_arg)
    try:
        return get_policy(name, **params) if params else get_policy(name)
    except NotImplementedError as err:
        raise CLIError(f"--policy {name}: {err}") from None
    except TypeError as err:  # a parameter the policy does not take
        raise CLIError(f"--policy {name} with --policy-arg {' '.join(args.policy_arg)}: {err}") from None
    except ValueError as err:
        raise CLIError(f"--policy {name}: {err}") from None


def make_plan(args, cfg, prompts, policy):
    """The inference plan of these flags for this model and these prompts (the library's one
    plan, `dms_jax.plan.plan_inference`), its cache checked against the memory available;
    returns (plan, max_len). Errors are the plan's, spelled as flags."""
    from dms_jax.plan import PlanError, check_memory, default_target_cr, plan_inference
    from dms_jax.policies import budget_for_ratio

    vocab = cfg.vocab_size
    for p in prompts:
        bad = [t for t in p.ids if not 0 <= t < vocab]
        if bad:
            raise CLIError(f"{p.source}: token id {bad[0]} is outside the model's vocabulary [0, {vocab})"
                           + ("" if p.text is None else "; the tokenizer does not match the model"))
    need = max(len(p.ids) + _row_new(args, p) for p in prompts)
    longest = max(prompts, key=lambda p: len(p.ids) + _row_new(args, p))
    detail = (f"{longest.source} has {len(longest.ids)} tokens + {_row_new(args, longest)} new tokens "
              f"= {need}")
    if args.max_len is not None and need > args.max_len:
        raise CLIError(f"{detail} > --max-len {args.max_len}: shorten the prompt, lower "
                       "--max-new-tokens or raise --max-len")
    if args.max_len is None and need > cfg.max_position_embeddings:
        raise CLIError(f"{detail} > the model's max_position_embeddings {cfg.max_position_embeddings}: "
                       "shorten the prompt or lower --max-new-tokens (--max-len overrides the limit)")
    max_len = args.max_len or need
    try:
        plan = plan_inference(cfg, policy=policy, window=args.window, capacity=args.capacity,
                              budget=args.budget, target_cr=args.target_cr, max_len=max_len,
                              chunk_size=args.chunk_size, margin=args.margin,
                              layout=args.layout, page_size=args.page_size)
        check_memory(plan, len(prompts))
    except PlanError as err:
        if err.field == "budget" and err.value is None:  # a baseline without its budget
            cr = default_target_cr(cfg) if args.target_cr is None else args.target_cr
            raise CLIError(
                f"--policy {policy.name} evicts down to a budget: add --budget N (held tokens "
                f"per layer, row and KV head), e.g. --budget {budget_for_ratio(max_len, cr)} "
                f"holds 1/{cr:g} of {max_len} tokens") from None
        raise CLIError(err.flag_message) from None
    except ValueError as err:  # the policy's own rules (a baseline's budget)
        size = (f" --budget {args.budget}" if args.budget is not None else
                f" --capacity {args.capacity}" if args.capacity is not None else "")
        raise CLIError(f"--policy {policy.name}{size}: {err}") from None
    return plan, max_len


def _row_new(args, prompt):
    return args.max_new_tokens if prompt.max_new_tokens is None else prompt.max_new_tokens


# ----------------------------------------------------------------------------------------------
# main


def run_generate(model, prompts, **kwargs):
    """The library call (a seam the tests use to prove errors come before any compute)."""
    import dms_jax

    return dms_jax.generate(model, prompts, **kwargs)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a malformed flag (2, already printed)
        return int(exit_.code or 0)

    def log(message):
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        return _main(args, log)
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, NotImplementedError, FileNotFoundError) as err:  # the library's checks
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _main(args, log) -> int:
    check_flags(args)
    parse_policy_args(args.policy_arg)
    if args.policy is not None:  # unknown / planned names fail before the model loads
        get_named_policy(args)

    from dms_jax.output import TextStream, render  # imports jax: not for --help
    from dms_jax.plan import default_policy
    from dms_jax.prompts import Prompt, read_prompts, stop_tokens
    from dms_jax.train.restore import load_for_inference

    model, tokenizer, model_dir, description = load_for_inference(
        args.model, train_config=args.train_config, base_model=args.base_model, dtype=args.dtype,
        log=log)
    if args.tokenizer:
        import dms_jax
        from dms_jax.hf import resolve_model_dir

        tokenizer = dms_jax.load_tokenizer(resolve_model_dir(os.path.expanduser(args.tokenizer)))
        if tokenizer is None:
            raise CLIError(f"--tokenizer {args.tokenizer} holds no tokenizer files (tokenizer.json ...)")
    cfg = model.config
    policy = get_named_policy(args, args.policy or default_policy(cfg))
    demo = _needle_demo(args, tokenizer)
    if demo is not None:  # a recall model and no input: the built-in needle question
        prompts = [Prompt(demo.ids, "the built-in needle question (dms_jax.eval.demo)")]
        args.stream = False  # the question, the answer and the expected one are printed instead
    else:
        prompts = read_prompts(tokenizer, prompt=args.prompt, prompt_file=args.prompt_file,
                               jsonl=args.jsonl, prompt_ids=args.prompt_ids, chat=args.chat,
                               default=DEFAULT_PROMPT)
    if args.max_new_tokens is None:
        args.max_new_tokens = demo.answer_tokens if demo is not None else DEFAULT_MAX_NEW_TOKENS
    if demo is not None and policy.name == "dms" and args.capacity is None and args.target_cr is None:
        args.capacity = len(demo.ids) + args.max_new_tokens  # room for every token: none dropped
    if demo is not None and not args.stop and not args.no_stop:
        stops = [demo.stop]
    else:
        stops = [] if args.no_stop else stop_tokens(args.stop, tokenizer, model_dir, cfg.vocab_size)
    plan, max_len = make_plan(args, cfg, prompts, policy)
    _log_inputs(log, description, cfg, prompts, plan, max_len)

    import jax

    from dms_jax.cache import CacheOverflowError

    streamer = TextStream(tokenizer, sys.stdout) if args.stream and len(prompts) == 1 else None
    per_row = [_row_new(args, p) for p in prompts]
    progress = Progress(max(len(p.ids) for p in prompts), max(per_row), streamer=streamer,
                        bars=not args.quiet and sys.stderr.isatty(),
                        lines=not args.quiet and not sys.stderr.isatty(), log=log)
    try:
        out = run_generate(
            model, [p.ids for p in prompts],
            max_new_tokens=per_row if len(set(per_row)) > 1 else per_row[0],
            policy=policy, window=args.window, target_cr=args.target_cr, margin=args.margin,
            capacity=args.capacity, budget=args.budget, max_len=max_len, chunk_size=args.chunk_size,
            layout=args.layout, page_size=args.page_size, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            key=jax.random.key(args.seed), stop_tokens=stops, strict=args.strict,
            progress=progress.prefill, on_tokens=progress.on_tokens,
            decode_segment=progress.decode_segment(args.decode_segment))
    except CacheOverflowError as err:  # --strict
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        progress.close()

    sequences = out.sequences()
    if streamer is not None:
        streamer.finish()
    elif demo is not None:
        print(textwrap.fill(render(tokenizer, demo.ids), width=100))
        print(f"\n{demo.report(tokenizer, sequences[0])}")
    else:
        for n, (p, seq) in enumerate(zip(prompts, sequences)):
            if len(prompts) > 1:
                label = p.id if p.id is not None else n
                print(f"--- [{label}] {p.source}: {len(p.ids)} prompt tokens, {len(seq)} generated ---")
            print(render(tokenizer, seq))
    stats = out.stats
    if not args.quiet:
        print(f"\n{stats.table()}")
    if stats.overflow and policy.counts_overflow and not args.quiet:
        log(f"note: {stats.overflow} tokens were dropped because a head's {stats.capacity} slots were "
            "full; raise --capacity or --margin, or lower --target-cr (--strict makes this an error)")
    write_outputs(args, prompts, sequences, stats, tokenizer, stops)
    return 0


def _log_inputs(log, description, cfg, prompts, plan, max_len):
    """The model line and the input line: what the plan decided (its capacity is the one the
    stats table shows)."""
    dms = f"DMS {cfg.dms.mode} window {cfg.dms.window}" if cfg.dms else "no DMS"
    total = sum(len(p.ids) for p in prompts)
    log(f"model: {description} ({cfg.model_type}, {cfg.num_layers} layers, vocab {cfg.vocab_size}, {dms})")
    log(f"input: {len(prompts)} prompt(s), {total} tokens; policy {plan.policy.name}"
        + (f", window {plan.window}" if plan.uses_decisions else "")
        + f", capacity {plan.capacity} slots/head, max-len {max_len} (cache allocated for "
          f"{plan.max_len} tokens per row)")


def _needle_demo(args, tokenizer):
    """The built-in needle question when no input is given and the tokenizer is the recall tasks'
    (the shipped recall models); else None."""
    if args.prompt or args.prompt_file or args.jsonl or args.prompt_ids:
        return None
    from dms_jax.eval.demo import knows_tasks, make_demo

    return make_demo(tokenizer) if knows_tasks(tokenizer) else None


def write_outputs(args, prompts, sequences, stats, tokenizer, stops):
    """--stats-json and --output-jsonl."""
    from dms_jax.output import render, stats_to_json

    if args.stats_json:
        with open(os.path.expanduser(args.stats_json), "w") as f:
            json.dump(stats_to_json(stats), f, indent=1)
    if args.output_jsonl:
        with open(os.path.expanduser(args.output_jsonl), "w") as f:
            for n, (p, seq) in enumerate(zip(prompts, sequences)):
                row = {"id": p.id if p.id is not None else n, "source": p.source,
                       "prompt_tokens": len(p.ids), "tokens": seq,
                       "text": render(tokenizer, seq) if tokenizer is not None else None,
                       "stopped": bool(seq) and seq[-1] in stops}
                f.write(json.dumps(row) + "\n")


class Progress:
    """Prefill and decode progress on stderr, and the streamed text.

    On a terminal (`bars`): tqdm bars, the prefill's moving chunk by chunk. Without one
    (`lines`: a log file, a pipe): a line at most every `LOG_EVERY_S` seconds, and at the start
    and end of each phase. `prefill` and `on_tokens` are `generate`'s callbacks.
    """

    def __init__(self, prompt_tokens, max_new, *, streamer, bars, lines, log):
        from tqdm.auto import tqdm

        self.tqdm, self.max_new, self.streamer = tqdm, max_new, streamer
        self.bars, self.lines, self.log = bars, lines, log
        self.prefill_bar = tqdm(total=prompt_tokens, desc="prefill (compiling)", unit="tok",
                                file=sys.stderr, disable=not bars, leave=False,
                                dynamic_ncols=True)
        self.decode_bar = None
        self.started = self.last_line = time.perf_counter()
        self.decoded = 0
        if lines:
            log(f"prefill: compiling ({prompt_tokens} prompt tokens)")

    def decode_segment(self, segment):
        """Tokens per decode call: cut into segments when anything follows the tokens (None: one
        call; no decode at all with --max-new-tokens 0)."""
        if self.max_new == 0 or not (self.streamer is not None or self.bars or self.lines):
            return None
        return min(segment, self.max_new)

    @property
    def on_tokens(self):
        return self._tokens if self.decode_segment(1) is not None else None

    def _due(self, final=False):
        now = time.perf_counter()
        if final or now - self.last_line >= LOG_EVERY_S:
            self.last_line = now
            return True
        return False

    def prefill(self, done, total):
        if done == 0:  # compiled: restart the clock so the rate excludes compiling
            self.prefill_bar.reset(total=total)
            self.prefill_bar.set_description("prefill", refresh=False)
            self.started = self.last_line = time.perf_counter()
            if self.lines:
                self.log(f"prefill: 0/{total} tokens")
            return
        self.prefill_bar.update(done - self.prefill_bar.n)
        if self.lines and self._due(final=done >= total):
            rate = done / max(time.perf_counter() - self.started, 1e-9)
            self.log(f"prefill: {done}/{total} tokens ({100 * done / total:.0f}%, "
                     f"{rate:.0f} tok/s)")

    def _tokens(self, new):
        if self.decoded == 0:
            self.prefill_bar.close()
            self.started = self.last_line = time.perf_counter()
        self.decoded += new.shape[1]
        if self.streamer is not None:
            self.streamer.feed(new[0])
        elif self.bars:
            if self.decode_bar is None:
                self.decode_bar = self.tqdm(total=self.max_new, desc="decode", unit="tok",
                                            file=sys.stderr, leave=False, dynamic_ncols=True)
            self.decode_bar.update(new.shape[1])
        if self.lines and self._due(final=self.decoded >= self.max_new):
            rate = self.decoded / max(time.perf_counter() - self.started, 1e-9)
            self.log(f"decode: {min(self.decoded, self.max_new)}/{self.max_new} tokens "
                     f"({rate:.1f} tok/s)")

    def close(self):
        self.prefill_bar.close()
        if self.decode_bar is not None:
            self.decode_bar.close()


if __name__ == "__main__":
    sys.exit(main())
