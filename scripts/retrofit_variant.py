"""Retrofit a variant of the recall model's DMS schedule and evaluate it (docs/recall.md's measurements).

Starts from a directory holding a vanilla model and its tokenizer (a finished
`scripts/build_recall_models.py` run, or the shipped model: `--base shipped`), writes the retrofit
documents (the build's seed 3, with the task mix optionally reweighted), runs the build's
`retrofit` stage with config overrides and its own legs, then its `eval` stage. Every stage
resumes like the build's. Measurement 12 (a hold at the schedule's end, with v5's task weights):

    python scripts/retrofit_variant.py --out runs/recall_hold --legs 2:70,4:250,8:1000 \
        --mix niah_multivalue=2,vt=1.5 --eval-legs 8

The last leg's steps are the run's length (`train.steps` is set per leg, so `--set` refuses it).
"""
import argparse
import ast
import copy
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build_recall_models as build  # noqa: E402


def _pairs(text: str, what: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=" if "=" in item else ":")
        if not sep:
            raise SystemExit(f"error: {what} entry {item!r} is not KEY=VALUE")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="run directory (created; resumed if it exists)")
    p.add_argument("--base", default="shipped",
                   help="directory with vanilla/ and tokenizer/ (default: the package's shipped vanilla model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="retrofit config override, e.g. train.cr_end=16 (repeatable)")
    legs = ",".join(f"{r}:{n}" for r, n in build.PRESETS["full"]["legs"])
    p.add_argument("--legs", default=legs, help=f"RATIO:STEPS exports (default the build's, {legs})")
    p.add_argument("--mix", default="", help="retrofit task weights over the build's, e.g. vt=3,niah_multivalue=4")
    p.add_argument("--eval-legs", default="", help="ratios to evaluate (default every leg)")
    p.add_argument("--stages", default="retrofit,eval")
    args = p.parse_args(argv)

    preset = copy.deepcopy(build.PRESETS["full"])
    preset["retrofit"] = {k: v for s in args.set for k, v in _pairs(s, "--set").items()}
    if "train.steps" in preset["retrofit"]:
        raise SystemExit("error: --set train.steps would override every leg's length; the last "
                         "--legs entry is the run's length (e.g. --legs 2:70,4:250,8:1000)")
    preset["legs"] = tuple(sorted((int(r), int(s)) for r, s in _pairs(args.legs, "--legs").items()))
    if args.eval_legs:
        preset["eval_legs"] = tuple(int(r) for r in args.eval_legs.split(","))
    mix = dict(build.RETROFIT_MIX, **_pairs(args.mix, "--mix"))

    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    if args.base == "shipped":
        from dms_jax.assets import ASSETS_DIR
        vanilla, tokenizer = os.path.join(ASSETS_DIR, "recall_vanilla"), os.path.join(ASSETS_DIR, "recall_vanilla")
    else:
        vanilla, tokenizer = os.path.join(args.base, "vanilla"), os.path.join(args.base, "tokenizer")
    if not os.path.exists(os.path.join(out, "vanilla")):
        shutil.copytree(vanilla, os.path.join(out, "vanilla"))
    if not os.path.exists(os.path.join(out, "tokenizer", "tokenizer.json")):
        os.makedirs(os.path.join(out, "tokenizer"), exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(os.path.join(tokenizer, f), os.path.join(out, "tokenizer", f))
    data = os.path.join(out, "data", "retrofit.jsonl")
    if not os.path.exists(data):
        import dms_jax

        build.write_retrofit_corpus(data, dms_jax.load_tokenizer(os.path.join(out, "tokenizer")),
                                    preset, mix)
    print(f"[variant] overrides {preset['retrofit']} legs {preset['legs']} mix {mix}", flush=True)
    for stage in (s.strip() for s in args.stages.split(",")):
        try:
            getattr(build, f"stage_{stage}")(out, preset)
        except build.StageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
