"""The suite's report: a markdown table and PNG plots (matplotlib, Agg) from results.json.

    write_all(results, out_dir)   # results.md, pareto.png, reads.png, heatmap.png
"""
from __future__ import annotations

import os

import numpy as np

from dms_jax.stats import format_bytes

FAMILY_STYLE = {  # family -> (colour, marker, line style)
    "dms": ("tab:red", "o", "-"),
    "streaming": ("tab:blue", "s", "--"),
    "h2o": ("tab:green", "^", "--"),
    "tova": ("tab:purple", "v", "--"),
    "snapkv": ("tab:orange", "D", "--"),
    "full": ("black", "*", ""),
}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _pct_ci(mean_ci) -> str:
    mean, ci = mean_ci
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f}" + ("" if ci is None else f" ± {100 * ci:.1f}")


def markdown(results: dict) -> str:
    """The results table (one row per method) and the command that produced it."""
    methods = results["methods"]
    tasks = list(results["examples"])
    head = (["method", "CR", "held tok/head"] + tasks
            + ["mean ± 95% CI", "peak KV / seq", "KV reads / seq", "overflow"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m in methods:
        cells = [m["method"], f"{m['compression_ratio']:.2f}x", f"{m['held_tokens_per_head']:.1f}"]
        cells += [_pct(m["accuracy"][t][0]) if t in m["accuracy"] else "n/a" for t in tasks]
        cells += [_pct_ci(m["mean"]), format_bytes(m["peak_kv_bytes"]),
                  f"{m['kv_reads']:.4g}", str(m["overflow"])]
        lines.append("| " + " | ".join(cells) + " |")
    any_task = next(iter(results["examples"].values()))
    seeds = any_task["seeds"]
    notes = [
        "",
        f"Accuracy in % (RULER string_match_all; exact match for one-word answers) over "
        f"{len(seeds)} examples per task (split \"eval\", seeds {seeds[0]}..{seeds[-1]}, "
        f"{any_task['length']} tokens each); mean ± the half-width of a normal 95% interval over "
        "all examples. CR = seen / held tokens at the end of each conversation; held tokens, "
        "peak KV bytes (keys + values) and KV reads (keys read by every query, prefill + "
        "decode, summed over layers and KV heads) are per sequence. Baselines (`name @ label`) "
        "run on the vanilla model at the held-token budget of the DMS run `label`.",
        "",
        f"Command: `{results['command']}`",
    ]
    return "\n".join(lines + notes) + "\n"


def _families(methods):
    """family -> methods of it sorted by held tokens (the full cache is its own family)."""
    out: dict[str, list] = {}
    for m in methods:
        out.setdefault(m["family"], []).append(m)
    return {f: sorted(ms, key=lambda m: m["held_tokens_per_head"]) for f, ms in out.items()}


def _accuracy_plot(methods, x_key, x_label, title, path, log_x=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    for index, (family, ms) in enumerate(_families(methods).items()):
        colour, marker, style = FAMILY_STYLE.get(family, ("gray", "x", ":"))
        xs = [m[x_key] for m in ms]
        ys = [100 * m["mean"][0] for m in ms]
        err = [100 * (m["mean"][1] or 0.0) for m in ms]
        name = "vanilla (full cache)" if family == "full" else family
        ax.errorbar(xs, ys, yerr=err, color=colour, marker=marker, linestyle=style or "none",
                    markersize=12 if family == "full" else 7, capsize=3, label=name)
        for m, x, y in zip(ms, xs, ys):  # families at one budget share x: stagger the labels
            if m.get("label"):
                ax.annotate(m["label"], (x, y), textcoords="offset points",
                            xytext=(6, 6 - 9 * (index % 4)), fontsize=8, color=colour)
    xs = [m[x_key] for m in methods if m[x_key] > 0]
    if log_x and xs and max(xs) > 20 * min(xs):
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("mean accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pareto(results: dict, path: str) -> None:
    """Mean accuracy vs held tokens per KV head: one line per method family across the DMS
    compression ratios, the vanilla model as a point."""
    _accuracy_plot(results["methods"], "held_tokens_per_head",
                   "held KV tokens per head (end of conversation)",
                   "Accuracy vs KV cache held (equal budgets per DMS ratio)", path)


def plot_reads(results: dict, path: str) -> None:
    """Mean accuracy vs KV reads per sequence (prefill + decode)."""
    _accuracy_plot(results["methods"], "kv_reads", "KV reads per sequence (keys read by all "
                   "queries, summed over layers and KV heads)", "Accuracy vs KV reads", path,
                   log_x=True)


def plot_heatmap(results: dict, path: str) -> None:
    """Fraction of tokens each layer x KV head keeps, one panel per DMS model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dms = [m for m in results["methods"] if m["family"] == "dms"]
    panels = dms or [m for m in results["methods"] if m["family"] == "full"][:1]
    if not panels:
        return
    layers, heads = np.asarray(panels[0]["kept_fraction"]).shape
    width = min(4 + 3.2 * len(panels), 20)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 1.2 + 0.45 * max(layers, 4)),
                             dpi=120, squeeze=False)
    image = None
    for ax, m in zip(axes[0], panels):
        kept = np.asarray(m["kept_fraction"], float)
        image = ax.imshow(kept, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"{m['method']}: CR {m['compression_ratio']:.2f}x", fontsize=9)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers))
        if layers * heads <= 96:
            for (i, j), v in np.ndenumerate(kept):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=list(axes[0]), label="fraction of tokens kept (held / seen)",
                 shrink=0.9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def write_all(results: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results))
    plot_pareto(results, os.path.join(out_dir, "pareto.png"))
    plot_reads(results, os.path.join(out_dir, "reads.png"))
    plot_heatmap(results, os.path.join(out_dir, "heatmap.png"))
