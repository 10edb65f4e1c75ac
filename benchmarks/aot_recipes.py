"""The README's ahead-of-time table: for each recipe the smallest TPU v5e / v5p slice on which its
retrofit train step fits with the recipe's mesh, and for Qwen3-8B and R1-32B at 32k tokens the
largest decode batch per slice for `full` and `dms` 8x. Every point is one
`python -m dms_jax.aot ...` command (printed, run in its own process under a timeout); results are
kept in a JSON file, so a rerun only compiles what is missing.

    python benchmarks/aot_recipes.py                      # everything (hours on a 2-core CPU)
    python benchmarks/aot_recipes.py --only train --recipes qwen_r1_1_5b
    python benchmarks/aot_recipes.py --table              # print the markdown tables from the JSON
    python benchmarks/aot_recipes.py train:qwen_r1_7b:v5p:2x2x1 decode:qwen3_8b:v5p:2x2x1  # these points

Needs libtpu (pip install -e ".[aot]").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("llama3_2_1b", "qwen_r1_1_5b", "qwen_r1_7b", "qwen3_8b", "qwen_r1_32b")
# slices by chip count (libtpu topology names)
SLICES = {
    "v5e": ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8"),
    "v5p": ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4"),
}
DECODE = {"qwen3_8b": ("v5e:2x2", "v5e:2x4", "v5p:2x2x1"), "qwen_r1_32b": ("v5e:2x4", "v5e:4x4", "v5p:2x2x1")}


def chips(topology: str) -> int:
    return math.prod(int(n) for n in topology.split(":")[1].split("x"))


def run_point(key: str, argv: list[str], results: dict, path: str, timeout: int) -> dict:
    """One `python -m dms_jax.aot` command, its JSON result stored under `key`."""
    if key in results:
        return results[key]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "dms_jax.aot", *argv, "--json", out]
        shown = "python -m dms_jax.aot " + " ".join(shlex.quote(a) for a in argv)
        print(f"$ {shown}", flush=True)
        try:
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            record = json.load(open(out)) if os.path.exists(out) else {}
            record.update(returncode=done.returncode, stderr_tail=done.stderr.strip().splitlines()[-1:])
            print(done.stdout, flush=True)
        except subprocess.TimeoutExpired:
            record = {"returncode": None, "timeout_s": timeout}
            print(f"  timed out after {timeout} s", flush=True)
    record["command"] = shown
    results[key] = record
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return record


def train_points(recipe: str, results: dict, path: str, timeout: int) -> None:
    """Slices in order of size, per family, until the recipe's train step fits."""
    for family, slices in SLICES.items():
        for topology in slices:
            record = train_point(recipe, topology, results, path, timeout)
            if record.get("fits") or (record.get("returncode") == 2 and "divisible" in str(record)):
                break  # fits, or the recipe's batch cannot be split over more chips


def train_point(recipe: str, topology: str, results: dict, path: str, timeout: int) -> dict:
    return run_point(f"train {recipe} {topology}",
                     ["train", "--config", f"configs/{recipe}.py", "--topology", topology], results, path, timeout)


def decode_point(recipe: str, topology: str, results: dict, path: str, timeout: int,
                 max_compiles: int = 3) -> dict:
    """Largest batch for full and dms 8x: two compiles give the line of bytes against batch, a
    third checks its crossing with the chip's memory (--max-compiles per policy)."""
    return run_point(f"decode {recipe} {topology}",
                     ["decode", "--config", f"configs/{recipe}.py", "--topology", topology, "--context", "32768",
                      "--policy", "full,dms", "--target-cr", "8", "--mesh", "1,-1,1",
                      "--max-compiles", str(max_compiles)], results, path, timeout)


def decode_points(recipe: str, results: dict, path: str, timeout: int) -> None:
    for topology in DECODE.get(recipe, ()):
        decode_point(recipe, topology, results, path, timeout)


def gib(n) -> str:
    return f"{n / 2 ** 30:.1f}"


def tables(results: dict) -> str:
    lines = ["| recipe | family | first slice tried that fits (smallest first) | mesh (data, fsdp, tensor) | per chip GiB "
             "(weights + opt / total / HBM) | compile s | command |", "| --- " * 7 + "|"]
    for recipe in RECIPES:
        for family, slices in SLICES.items():
            tried = [(t, results.get(f"train {recipe} {t}")) for t in slices]
            tried = [(t, r) for t, r in tried if r]
            fit = next(((t, r) for t, r in tried if r.get("fits")), None)
            if fit:
                t, r = fit
                lines.append(f"| {recipe} | {family} | {t} ({chips(t)} chips) | {tuple(r['mesh'])} | "
                             f"{gib(r['weights'] + r['optimizer'])} / {gib(r['total'])} / {gib(r['limit'])} | "
                             f"{r['compile_s']:.0f} | `{r['command']}` |")
            elif tried:
                t, r = tried[-1]
                why = (f"{gib(r['total'])} GiB per chip on {t}" if "total" in r else
                       (r.get("stderr_tail") or ["timed out"])[0][:120])
                lines.append(f"| {recipe} | {family} | none tried fits (largest tried {t}: {why}) | | | | "
                             f"`{r['command']}` |")
    lines += ["", "| model | slice | full: largest batch | dms 8x: largest batch | dms / full | "
              "cache slots per head full / dms | command |", "| --- " * 7 + "|"]
    for recipe, slices in DECODE.items():
        for t in slices:
            r = results.get(f"decode {recipe} {t}")
            if not r or "policies" not in r:
                continue
            full, dms = r["policies"].get("full", {}), r["policies"].get("dms", {})
            fb, db = full.get("largest_batch"), dms.get("largest_batch")
            ratio = f"{db / fb:.1f}x" if fb else "-"
            lines.append(f"| {recipe} | {t} ({chips(t)} chips) | {fb} | {db} | {ratio} | "
                         f"{full.get('capacity')} / {dms.get('capacity')} | `{r['command']}` |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "aot_recipes.json"))
    parser.add_argument("--only", choices=("train", "decode"), default=None)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per command")
    parser.add_argument("--table", action="store_true", help="only print the tables from --out")
    parser.add_argument("--max-compiles", type=int, default=3, help="decode: compiles per policy's batch search")
    parser.add_argument("points", nargs="*", help="kind:recipe:topology (train or decode), in this order")
    args = parser.parse_args()
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for point in args.points:
        kind, recipe, topology = point.split(":", 2)
        if kind == "train":
            train_point(recipe, topology, results, args.out, args.timeout)
        else:
            decode_point(recipe, topology, results, args.out, args.timeout, args.max_compiles)
    if not args.table and not args.points:
        for recipe in args.recipes.split(","):
            if args.only in (None, "train"):
                train_points(recipe, results, args.out, args.timeout)
            if args.only in (None, "decode"):
                decode_points(recipe, results, args.out, args.timeout)
    print(tables(results))


if __name__ == "__main__":
    main()
