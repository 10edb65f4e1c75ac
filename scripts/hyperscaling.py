"""Hyper-scaling in miniature: at an equal KV-read budget, does DMS 8x spend what it saves on
parallel samples with a majority vote, and beat the vanilla model? (docs/recall.md)

    python scripts/hyperscaling.py --out docs/results/hyperscaling

On held-out task examples (split "eval", seeds --seed ..), through `dms_jax.eval.harness`:
  1. the vanilla model, greedy, full cache: its KV reads per example are the budget;
  2. the DMS model, greedy (`dms`, a cache that holds every token it keeps: never overflows);
  3. the DMS model sampled K times per example at --temperature; maj@k (each question scored on
     the majority answer of the first k samples) for k = 1 .. K, from the one run.
K (--samples) defaults to the most DMS samples whose KV reads per example fit in the vanilla
model's, measured by the two greedy runs (at most --max-samples). Writes results.md (the table
and the command), results.json (the figures, no transcripts) and accuracy_vs_reads.png.
--quick: one task, 2 examples, 2 samples (a seconds-scale check of the script).
"""
import argparse
import json
import math
import os
import shlex
import sys
import time

import dms_jax
from dms_jax.assets import SHIPPED_MODELS
from dms_jax.eval import harness as H
from dms_jax.eval import tasks as T


def vote_curve(examples, result: H.EvalResult) -> list[dict]:
    """maj@k for k = 1 .. samples from a sampled run's transcripts: per task and mean accuracy
    (%, with the 95% half-width) and the KV reads per example that k samples cost."""
    curve = []
    for k in range(1, result.samples + 1):
        scores: dict[str, list[float]] = {}
        for ex, tr in zip(examples, result.transcripts):
            voted = [H.majority(turn[:k]) for turn in zip(*tr["sampled_answers"])]
            scores.setdefault(ex.task, []).append(T.score_example(ex, voted))
        every = [s for v in scores.values() for s in v]
        mean, half = T.mean_ci95(every)
        curve.append(dict(k=k, kv_reads_per_example=k * result.kv_reads,
                          accuracy={t: 100 * T.mean_ci95(v)[0] for t, v in scores.items()},
                          mean=100 * mean, ci95=100 * half))
    return curve


def _row(label, accuracy, mean, ci95, reads, budget, tasks):
    """One table row; accuracy: task -> %, mean and ci95 in %."""
    return (f"| {label} | {reads:.3g} | {reads / budget:.2f} | "
            + " | ".join(f"{accuracy[t]:.1f}" for t in tasks) + f" | {mean:.1f} ± {ci95:.1f} |")


def _greedy_row(label, result: H.EvalResult, budget, tasks):
    return _row(label, {t: 100 * result.accuracy[t][0] for t in tasks}, 100 * result.mean[0],
                100 * result.mean[1], result.kv_reads_per_example, budget, tasks)


def markdown(rows, tasks, budget, args, command) -> str:
    head = ("| method | KV reads / example | / vanilla | " + " | ".join(tasks)
            + " | mean ± 95% CI |")
    lines = [head, "|" + "---|" * (4 + len(tasks))] + rows
    lines += ["", f"Accuracy in % over {args.examples} examples per task (split \"eval\", seeds "
              f"{args.seed}..{args.seed + args.examples - 1}, {args.length} tokens). KV reads: keys read by "
              "every query of every sampled conversation (prefill + decode, summed over layers "
              "and KV heads). maj@k: each question scored on the most frequent answer of the "
              f"first k samples at temperature {args.temperature} (ties: the first sampled). "
              "Rows at or under 1.00 of vanilla's reads are at equal KV-read budget.",
              "", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def plot(vanilla, greedy, curve, path, budget):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar([c["kv_reads_per_example"] for c in curve], [c["mean"] for c in curve],
                yerr=[c["ci95"] for c in curve], fmt="o-", capsize=3, color="tab:green",
                label=f"DMS {greedy.compression_ratio:.2f}x, maj@k of sampled answers (95% CI)")
    for c in curve:
        ax.annotate(f"k={c['k']}", (c["kv_reads_per_example"], c["mean"]), fontsize=7,
                    textcoords="offset points", xytext=(3, -10))
    ax.errorbar([greedy.kv_reads], [100 * greedy.mean[0]], yerr=[100 * greedy.mean[1]], fmt="s",
                capsize=3, color="tab:green", mfc="none",
                label=f"DMS {greedy.compression_ratio:.2f}x, greedy")
    ax.errorbar([vanilla.kv_reads], [100 * vanilla.mean[0]], yerr=[100 * vanilla.mean[1]],
                fmt="*", ms=12, capsize=3, color="black", label="vanilla, greedy, full cache")
    ax.axvline(budget, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("KV reads per example (keys read by every query of every sample)")
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title("Equal KV reads: one vanilla answer or k DMS samples voted")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--vanilla", default=SHIPPED_MODELS["vanilla"], help="vanilla model directory")
    p.add_argument("--dms", default=SHIPPED_MODELS["dms8x"], help="DMS model directory")
    p.add_argument("--tasks", default="all", help=f"'all' or a comma list of {', '.join(T.TASKS)}")
    p.add_argument("--length", type=int, default=255)
    p.add_argument("--examples", type=int, default=50, help="examples per task")
    p.add_argument("--seed", type=int, default=2000,
                   help="first evaluation seed (default 2000: seeds no choice of the models saw)")
    p.add_argument("--samples", type=int, default=0,
                   help="DMS samples per example (0: as many as fit in the vanilla model's KV reads)")
    p.add_argument("--max-samples", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--sample-seed", type=int, default=0, help="PRNG seed of the sampling")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="results/hyperscaling")
    p.add_argument("--quick", action="store_true", help="niah_single, 2 examples, 2 samples")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.examples, args.samples = "niah_single", 2, 2
    if args.temperature <= 0:
        raise SystemExit(f"error: --temperature {args.temperature}: a majority vote needs "
                         "samples that can differ (> 0)")
    tasks = list(T.EVAL_TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",")]
    for t in tasks:
        T.check_task(t)
    command = "python scripts/hyperscaling.py " + shlex.join(argv)

    vanilla_model = dms_jax.from_pretrained(args.vanilla)
    dms_model = dms_jax.from_pretrained(args.dms)
    if dms_model.config.dms is None:
        raise SystemExit(f"error: --dms {args.dms} has no 'dms' block in its config.json: pass a "
                         "DMS retrofit's export")
    tokenizer = dms_jax.load_tokenizer(args.vanilla)
    if dms_jax.load_tokenizer(args.dms).get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"error: --dms {args.dms} and --vanilla {args.vanilla} have different "
                         "tokenizers: the DMS model must be a retrofit of the vanilla one")
    examples = [ex for t in tasks
                for ex in T.make_examples(t, args.examples, args.length, split="eval",
                                          first_seed=args.seed)]
    max_answer = H.default_max_answer_tokens(examples)
    kw = dict(batch_size=args.batch_size, max_answer_tokens=max_answer)
    t0 = time.perf_counter()
    vanilla = H.evaluate(vanilla_model, tokenizer, examples, policy="full", method="vanilla", **kw)
    greedy = H.evaluate(dms_model, tokenizer, examples, policy="dms", method="dms greedy", **kw)
    budget = vanilla.kv_reads_per_example
    samples = args.samples or max(1, min(args.max_samples, math.floor(budget / greedy.kv_reads)))
    print(f"vanilla {100 * vanilla.mean[0]:.1f}% at {budget:.3g} KV reads per example; DMS greedy "
          f"{100 * greedy.mean[0]:.1f}% at {greedy.kv_reads:.3g}; sampling {samples} per example",
          flush=True)
    sampled = H.evaluate(dms_model, tokenizer, examples, policy="dms", samples=samples,
                         temperature=args.temperature, seed=args.sample_seed,
                         method=f"dms x{samples}", **kw)
    curve = vote_curve(examples, sampled)
    assert abs(curve[-1]["mean"] - 100 * sampled.mean[0]) < 1e-9  # maj@K is the run's own vote

    rows = [_greedy_row("vanilla, greedy, full cache", vanilla, budget, tasks),
            _greedy_row(f"DMS {greedy.compression_ratio:.2f}x, greedy", greedy, budget, tasks)]
    rows += [_row(f"DMS, maj@{c['k']}" if c["k"] > 1 else "DMS, one sample", c["accuracy"],
                  c["mean"], c["ci95"], c["kv_reads_per_example"], budget, tasks) for c in curve]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(rows, tasks, budget, args, command))
    figures = lambda r: {k: v for k, v in r.to_dict().items() if k != "transcripts"}  # noqa: E731
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(command=command, temperature=args.temperature, samples=samples,
                       vanilla=figures(vanilla), dms_greedy=figures(greedy),
                       dms_sampled=figures(sampled), maj_at_k=curve), f, indent=1)
    plot(vanilla, greedy, curve, os.path.join(args.out, "accuracy_vs_reads.png"), budget)
    print(open(os.path.join(args.out, "results.md")).read())
    print(f"{time.perf_counter() - t0:.0f} s; wrote {args.out}/results.md, results.json, "
          "accuracy_vs_reads.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
