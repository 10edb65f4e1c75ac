"""Learning curves of training runs: held-out task accuracy (the `eval/*` metrics that
`train.py` writes every `eval.every` steps) and the loss, against steps and wall-clock minutes.

    python -m dms_jax.eval.curves runs/recall/pretrain/metrics.jsonl [LABEL=PATH ...] --out curve.png
"""
from __future__ import annotations

import argparse
import os
import sys

from dms_jax.train.metrics import load_records


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl, the last one of each step (a torn line is skipped and
    named by `dms_jax.train.metrics.load_records`)."""
    by_step = {r["step"]: r for r in load_records(path) if isinstance(r.get("step"), int)}
    return [by_step[k] for k in sorted(by_step)]


def curve(records: list[dict]) -> dict:
    """Steps, minutes (summed step times), loss, and eval/mean with its per-task scores."""
    minutes, total = [], 0.0
    for r in records:
        total += float(r.get("step_time", 0.0))
        minutes.append(total / 60)
    evals = [(r["step"], m, r["eval/mean"], {k[5:]: v for k, v in r.items() if k.startswith("eval/")})
             for r, m in zip(records, minutes) if "eval/mean" in r]
    loss_key = "ce" if records and "ce" in records[0] else "loss"
    return {"steps": [r["step"] for r in records], "minutes": minutes,
            "loss": [r.get(loss_key) for r in records], "evals": evals}


def plot(runs: dict[str, str], out: str) -> None:
    """A PNG: eval/mean vs steps, vs minutes, and the loss vs steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, path in runs.items():
        c = curve(read_metrics(path))
        if c["evals"]:
            steps, mins, acc, _ = zip(*c["evals"])
            axes[0].plot(steps, [100 * a for a in acc], marker=".", label=label)
            axes[1].plot(mins, [100 * a for a in acc], marker=".", label=label)
        axes[2].plot(c["steps"], c["loss"], lw=0.8, label=label)
    axes[0].set(xlabel="step", ylabel="held-out accuracy (%)", title="accuracy vs steps")
    axes[1].set(xlabel="minutes of training (this CPU)", ylabel="held-out accuracy (%)",
                title="accuracy vs time")
    axes[2].set(xlabel="step", ylabel="loss on answers", title="training loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="metrics.jsonl paths, optionally LABEL=PATH")
    p.add_argument("--out", default="learning_curve.png")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, _, path = item.rpartition("=") if "=" in item else (None, None, item)
        if not os.path.exists(path):
            p.error(f"{path}: no such metrics file (train.py writes OUTPUT_DIR/metrics.jsonl)")
        runs[label or os.path.basename(os.path.dirname(os.path.abspath(path)))] = path
    plot(runs, args.out)
    for label, path in runs.items():
        c = curve(read_metrics(path))
        last = c["evals"][-1] if c["evals"] else None
        print(f"{label}: {c['steps'][-1] if c['steps'] else 0} steps in {c['minutes'][-1] if c['minutes'] else 0:.1f} min"
              + (f"; held-out accuracy {100 * last[2]:.1f}% at step {last[0]}" if last else ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
