"""The evaluation suite behind `python -m dms_jax.eval` (documented in docs/eval.md).

    python -m dms_jax.eval --vanilla DIR --dms 2x=DIR --dms 4x=DIR --dms 8x=DIR \\
        --tasks all --length 255 --examples 50 --batch-size 16 --out results/ --seed 0

Runs, on held-out task examples (split "eval", seeds seed .. seed + examples - 1 per task):
  1. the vanilla model with the full cache (`full`);
  2. each DMS model with `dms` (strict: a run that drops a token for lack of slots is an error;
     `--capacity LABEL=N` sizes its cache, default: room for the whole conversation);
  3. for each DMS model, `streaming`, `h2o`, `tova`, `snapkv` on the vanilla model at that DMS
     run's held-token budget (`budget_from_stats` over all its sequences).
Writes `results.json` (every figure, per-example scores and answers), `results.md` (the table
and the command) and `pareto.png`, `reads.png`, `heatmap.png` into `--out`.

Everything that can be checked is checked before any model runs: task names, the length against
each task's needs, model directories (config.json, a tokenizer, the same tokenizer for every
model, a DMS block for the DMS models), the baselines' parameters; the baselines' budgets are
checked once the DMS runs have measured them, before any baseline runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time

from dms_jax.eval import harness as H
from dms_jax.eval import tasks as T
from dms_jax.policies import get_policy


class SuiteError(ValueError):
    """Bad suite input; the message names the value and the fix."""


@dataclasses.dataclass
class SuiteConfig:
    vanilla: str | None
    dms: list[tuple[str, str]]  # (label, directory)
    tasks: list[str]
    length: int = 255
    examples: int = 50
    batch_size: int = 16
    out: str = "results"
    seed: int = 0
    capacities: dict[str, int] = dataclasses.field(default_factory=dict)  # label -> slots
    baselines: tuple[str, ...] = H.BASELINES
    snapkv_window: int = 16
    sinks: int = 4
    max_answer_tokens: int | None = None
    chunk_size: int = H.EVAL_CHUNK
    command: str = ""

    def baseline_params(self, name: str) -> dict:
        return {"snapkv": {"obs_window": self.snapkv_window},
                "streaming": {"sinks": self.sinks}}.get(name, {})


# ----------------------------------------------------------------------------- command line


def _labelled(text: str, what: str) -> tuple[str, str]:
    label, sep, value = text.partition("=")
    if not sep or not label or not value:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: use LABEL=VALUE, e.g. 8x=models/dms8")
    return label, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dms_jax.eval",
        description="Evaluate a vanilla model (full cache), DMS retrofits and the training-free "
                    "baselines at the DMS runs' budgets on held-out synthetic long-context tasks.")
    p.add_argument("--vanilla", help="the vanilla model directory (HF layout with tokenizer)")
    p.add_argument("--dms", action="append", default=[], metavar="LABEL=DIR",
                   type=lambda s: _labelled(s, "--dms"),
                   help="a DMS model and its label, e.g. 8x=models/dms8 (repeat)")
    p.add_argument("--tasks", default="all",
                   help=f"'all' or a comma list of {', '.join(T.TASKS)}")
    p.add_argument("--length", type=int, default=255,
                   help="tokens per example (<s>, context, questions, reference answers)")
    p.add_argument("--examples", type=int, default=50, help="examples per task")
    p.add_argument("--batch-size", type=int, default=16, help="conversations per generate call")
    p.add_argument("--out", default="results", help="output directory")
    p.add_argument("--seed", type=int, default=0,
                   help="first evaluation seed (split 'eval', disjoint from training seeds)")
    p.add_argument("--capacity", action="append", default=[], metavar="LABEL=N",
                   type=lambda s: _labelled(s, "--capacity"),
                   help="cache slots per head for a DMS model (e.g. from the retrofit's measured "
                        "held maximum); default: room for every token (never overflows)")
    p.add_argument("--baselines", default=",".join(H.BASELINES),
                   help="comma list of baselines to run at each DMS budget, or 'none'")
    p.add_argument("--snapkv-window", type=int, default=16,
                   help="SnapKV's observation window (its minimum budget is this + 1)")
    p.add_argument("--sinks", type=int, default=4, help="StreamingLLM's attention sinks")
    p.add_argument("--max-answer-tokens", type=int, default=None,
                   help="most tokens per answer (default: longest reference + 3)")
    p.add_argument("--chunk-size", type=int, default=H.EVAL_CHUNK,
                   help="prefill chunk: the baselines evict after each chunk, so a chunk as long "
                        "as the prompt would let them read all of it before evicting (default %(default)s)")
    return p


def parse_args(argv=None) -> SuiteConfig:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    tasks = list(T.EVAL_TASKS) if args.tasks.strip() == "all" else [
        t.strip() for t in args.tasks.split(",") if t.strip()]
    baselines = () if args.baselines.strip() == "none" else tuple(
        b.strip() for b in args.baselines.split(",") if b.strip())
    capacities = {}
    for label, value in args.capacity:
        try:
            capacities[label] = int(value)
        except ValueError:
            raise SuiteError(f"--capacity {label}={value}: the capacity must be an integer "
                             "(slots per layer, row and KV head)") from None
    return SuiteConfig(
        vanilla=args.vanilla, dms=list(args.dms), tasks=tasks, length=args.length,
        examples=args.examples, batch_size=args.batch_size, out=args.out, seed=args.seed,
        capacities=capacities, baselines=baselines, snapkv_window=args.snapkv_window,
        sinks=args.sinks, max_answer_tokens=args.max_answer_tokens, chunk_size=args.chunk_size,
        command="python -m dms_jax.eval " + shlex.join(argv))


# ----------------------------------------------------------------------------- checks


@dataclasses.dataclass
class Prepared:
    examples: list[T.Example]
    seeds: list[int]
    tokenizer: object
    max_answer_tokens: int


def _model_dir(path: str, arg: str, *, dms: bool) -> dict:
    """config.json of a model directory; arg: the flag and value, e.g. `--dms 8x=DIR`."""
    if not os.path.isdir(path):
        raise SuiteError(f"{arg}: no such directory; pass a model directory "
                         "(config.json, *.safetensors, tokenizer.json)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise SuiteError(f"{arg}: the directory has no config.json; pass a directory written by "
                         "dms_jax.save_pretrained or train.py's export")
    with open(cfg_path) as f:
        hf = json.load(f)
    if dms and not hf.get("dms"):
        raise SuiteError(f"{arg} is not a DMS model (its config.json has no 'dms' block): pass "
                         "a retrofit export, or evaluate it as --vanilla")
    return hf


def _tokenizer(path: str, arg: str):
    from dms_jax.hf import load_tokenizer

    tok = load_tokenizer(path)
    if tok is None:
        raise SuiteError(
            f"{arg}: the model has no tokenizer (tokenizer.json): save it with "
            "dms_jax.save_pretrained(model, dir, tokenizer=...) or copy the tasks' tokenizer "
            "files (dms_jax.eval.tokenizer.save_tokenizer) into it")
    return tok


def prepare(config: SuiteConfig) -> Prepared:
    """Every check that needs no model run; raises SuiteError / TaskError with the fix."""
    if not config.tasks:
        raise SuiteError("--tasks is empty; use 'all' or a comma list of " + ", ".join(T.TASKS))
    for name in config.tasks:
        T.check_task(name)
    if len(set(config.tasks)) != len(config.tasks):
        raise SuiteError(f"--tasks {','.join(config.tasks)} names a task twice")
    for value, flag in ((config.examples, "--examples"), (config.batch_size, "--batch-size")):
        if value < 1:
            raise SuiteError(f"{flag} {value} must be >= 1")
    if config.seed < 0:
        raise SuiteError(f"--seed {config.seed} must be >= 0")
    if config.vanilla is None and not config.dms:
        raise SuiteError("nothing to evaluate: pass --vanilla DIR and/or --dms LABEL=DIR")
    labels = [label for label, _ in config.dms]
    if len(set(labels)) != len(labels):
        raise SuiteError(f"--dms labels {labels} repeat; give each DMS model its own label")
    for label, cap in config.capacities.items():
        if label not in labels:
            raise SuiteError(f"--capacity {label}={cap}: no --dms model is labelled {label!r} "
                             f"(labels: {', '.join(labels) or 'none'})")
        if cap < 1:
            raise SuiteError(f"--capacity {label}={cap} must be >= 1")
    for name in config.baselines:
        if name not in H.BASELINES:
            raise SuiteError(f"--baselines: unknown baseline {name!r}; use a comma list of "
                             f"{', '.join(H.BASELINES)} or 'none'")
        try:
            get_policy(name, **config.baseline_params(name))
        except ValueError as err:
            raise SuiteError(f"--baselines {name}: {err}") from err
    if config.baselines and config.dms and config.vanilla is None:
        raise SuiteError("the baselines run on the vanilla model at each DMS budget: pass "
                         "--vanilla DIR, or --baselines none")
    if config.chunk_size < 1:
        raise SuiteError(f"--chunk-size {config.chunk_size} must be >= 1")
    if config.max_answer_tokens is not None and config.max_answer_tokens < 1:
        raise SuiteError(f"--max-answer-tokens {config.max_answer_tokens} must be >= 1")

    # examples first: a length too short for a task is a TaskError naming the length it needs
    examples, seeds = [], []
    for name in config.tasks:
        try:
            examples += T.make_examples(name, config.examples, config.length, split="eval",
                                        first_seed=config.seed)
        except T.TaskError as err:
            raise SuiteError(f"--length {config.length}: {err}") from err
        seeds += list(range(config.seed, config.seed + config.examples))

    dirs = ([(f"--vanilla {config.vanilla}", config.vanilla, False)] if config.vanilla else [])
    dirs += [(f"--dms {label}={path}", path, True) for label, path in config.dms]
    tokenizer, vocab = None, None
    for arg, path, is_dms in dirs:
        hf = _model_dir(path, arg, dms=is_dms)
        tok = _tokenizer(path, arg)
        if vocab is None:
            tokenizer, vocab = tok, tok.get_vocab()
        elif tok.get_vocab() != vocab:
            raise SuiteError(f"{arg}: its tokenizer differs from the first model's; every model "
                             "must share the tasks' tokenizer")
        if int(hf.get("vocab_size", 0)) < len(vocab):
            raise SuiteError(f"{arg}: vocab_size {hf.get('vocab_size')} < the tokenizer's "
                             f"{len(vocab)} tokens: the tokenizer does not belong to this model")
    for ex in examples:  # every task word is in the tokenizer
        H.encode_turns(ex, tokenizer)
    max_answer = config.max_answer_tokens or H.default_max_answer_tokens(examples)
    return Prepared(examples, seeds, tokenizer, max_answer)


def check_baseline_budgets(config: SuiteConfig, budgets: dict[str, int]) -> None:
    """Every baseline at every DMS budget, before any baseline runs."""
    flags = {"snapkv": "--snapkv-window", "streaming": "--sinks"}
    for label, budget in budgets.items():
        for name in config.baselines:
            try:
                get_policy(name, **config.baseline_params(name)).check_budget(budget)
            except ValueError as err:
                fix = f"; lower {flags[name]}" if name in flags else ""
                raise SuiteError(f"{name} at the held-token budget of dms {label} ({budget} per "
                                 f"KV head): {err}{fix}, or drop it with --baselines") from err


# ----------------------------------------------------------------------------- the run


def run_suite(config: SuiteConfig, *, progress=True) -> dict:
    """Run every method (see the module docstring); returns the results.json dict."""
    import dms_jax
    from dms_jax.eval import report

    prep = prepare(config)
    os.makedirs(config.out, exist_ok=True)
    n_methods = (1 if config.vanilla else 0) + len(config.dms) * (1 + len(config.baselines) * (
        config.vanilla is not None))
    common = dict(batch_size=config.batch_size, max_answer_tokens=prep.max_answer_tokens,
                  chunk_size=config.chunk_size, progress=progress)
    results = {"command": config.command, "config": _jsonable_config(config),
               "examples": {t: {"split": "eval", "length": config.length,
                                "seeds": list(range(config.seed, config.seed + config.examples))}
                            for t in config.tasks},
               "complete": False, "methods": []}
    bar = _bar(n_methods) if progress else None
    t0 = time.perf_counter()

    def record(result: H.EvalResult, family: str, label: str | None, model_dir: str):
        entry = result.to_dict()
        entry.update(family=family, label=label, model=os.path.abspath(model_dir))
        results["methods"].append(entry)
        _write_json(config.out, results)  # after every method: a stopped run keeps its results
        if bar is not None:
            bar.set_postfix_str(f"{result.method}: {100 * result.mean[0]:.1f}%")
            bar.update(1)

    vanilla = dms_jax.from_pretrained(config.vanilla) if config.vanilla else None
    if vanilla is not None:
        record(H.evaluate(vanilla, prep.tokenizer, prep.examples, policy="full",
                          method="full", **common), "full", None, config.vanilla)
    budgets = {}
    for label, path in config.dms:
        model = dms_jax.from_pretrained(path)
        result = H.evaluate(model, prep.tokenizer, prep.examples, policy="dms",
                            capacity=config.capacities.get(label), method=f"dms {label}",
                            **common)
        budgets[label] = H.budget_for(result)
        record(result, "dms", label, path)
        del model
    if vanilla is not None and config.baselines:
        check_baseline_budgets(config, budgets)
        for label, _ in config.dms:
            for name in config.baselines:
                record(H.evaluate(vanilla, prep.tokenizer, prep.examples, policy=name,
                                  budget=budgets[label],
                                  policy_params=config.baseline_params(name),
                                  method=f"{name} @ {label}", **common), name, label,
                       config.vanilla)
    if bar is not None:
        bar.close()
    results["complete"] = True
    results["seconds"] = time.perf_counter() - t0
    _write_json(config.out, results)
    report.write_all(results, config.out)
    return results


def _jsonable_config(config: SuiteConfig) -> dict:
    d = dataclasses.asdict(config)
    d["dms"] = [list(x) for x in config.dms]
    d["baselines"] = list(config.baselines)
    return d


def _write_json(out: str, results: dict) -> None:
    path = os.path.join(out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="methods", unit="method")


def main(argv=None) -> int:
    try:
        config = parse_args(argv)
        results = run_suite(config)
    except (SuiteError, T.TaskError, H.EvalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from dms_jax.eval import report

    print(report.markdown(results))
    print(f"wrote {os.path.join(config.out, 'results.json')}, results.md, pareto.png, "
          "reads.png, heatmap.png")
    return 0
