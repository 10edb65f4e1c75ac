"""Build the proof's artefacts from scratch: tokenizer, corpora, the vanilla recall model, its DMS
retrofit at 2x / 4x / 8x, the evaluation against every baseline, and the shipped copies.

    python scripts/build_recall_models.py                  # everything (hours on a 2-core CPU)
    python scripts/build_recall_models.py --stages eval    # one stage (its inputs must exist)
    python scripts/build_recall_models.py --preset tiny --out /tmp/recall   # the CI version

Stages: tokenizer; corpus (the warm-up, short, pretraining and retrofit documents); warmup_cwe
(`cwe` and `repeat` documents 1:1 from a random model: the counting circuit forms first);
warmup (the induction circuit, `repeat` and `cwe` 3:1); pretrain_short (every task on 64-token rows);
pretrain (documents up to 255 tokens); pretrain_more (fresh documents, the hardest tasks weighted
up: the vanilla model); retrofit (one CR schedule, exported at 2x, 4x and 8x);
eval; ship (the vanilla and 8x models into dms_jax/assets, the results into docs/results).

Each stage writes into --out (default runs/recall) and is skipped when its outputs exist, so a
stopped run continues from its last finished stage; pretraining and the retrofit also resume
from their newest checkpoint inside the stage. A stage that fails leaves the earlier stages'
artefacts in place and the error names the stage to rerun. Wall times go to OUT/timings.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STAGES = ("tokenizer", "corpus", "warmup_cwe", "warmup", "pretrain_short", "pretrain", "pretrain_more", "retrofit",
          "eval", "ship")
# pretraining: the evaluation tasks plus the repeat warm-up (it forms the induction circuit that
# recall needs)
EVAL_MIX = dict(niah_single=1, niah_multikey=2, niah_multivalue=2, niah_multiquery=2, mqar=3, vt=1.5, cwe=1.5)
TASK_MIX = dict(repeat=6, **EVAL_MIX)
# the retrofit distils on the evaluation tasks alone, the two that an 8x cache lost most with
# the pretraining weights (multi-value needles, variable tracking) weighted up
# (docs/recall.md, measurement 12)
RETROFIT_MIX = dict(EVAL_MIX, niah_multivalue=4, vt=3)
# the warm-ups: `cwe` needs a head that reads the whole list; a model whose heads already do
# induction never learned it (0% after 1,200 more steps), and a model trained on `cwe` alone
# never learned induction afterwards (loss at chance for 700 steps), so both start together:
# 1:1 from the random model (cwe is learned, induction not yet), then 3:1 (induction forms)
WARMUP_CWE_MIX = dict(cwe=1, repeat=1)
WARMUP_MIX = dict(cwe=1, repeat=3)
# the last pretraining phase: fresh documents, the two tasks furthest from solved weighted up
PRETRAIN_MORE_MIX = dict(TASK_MIX, niah_multivalue=3, cwe=3)

# sizes per preset; "full" is what ships, "tiny" runs in about a minute (CI)
PRESETS = {
    "full": dict(
        pretrain_docs=60000, doc_lengths=(63, 127, 255), retrofit_docs=8000, retrofit_length=255,
        short_docs=60000, short_length=63, warmup_docs=40000,
        warmup_cwe={"train.seq_len": 64, "train.batch_size": 32, "train.warmup_steps": 50,
                    "train.steps": 1000, "eval.every": 0},
        warmup={"train.seq_len": 64, "train.batch_size": 32, "train.warmup_steps": 50,
                "train.steps": 1000, "eval.every": 0},
        pretrain_short={"train.seq_len": 64, "train.batch_size": 32, "train.warmup_steps": 100,
                        "train.steps": 1800},
        pretrain={"train.steps": 900, "train.warmup_steps": 20}, more_docs=30000,
        pretrain_more={"train.steps": 600, "train.warmup_steps": 20, "train.learning_rate": 5e-4},
        retrofit={},
        legs=((2, 70), (4, 250), (8, 1000)),  # the schedule ends at 800; the last 200 steps hold
        eval_args=["--length", "255", "--examples", "50"],
    ),
    "tiny": dict(
        pretrain_docs=300, doc_lengths=(31, 63), retrofit_docs=100, retrofit_length=63,
        short_docs=200, short_length=31, warmup_docs=100,
        warmup_cwe={"model.init.hidden_size": 32, "model.init.intermediate_size": 64,
                     "model.init.num_layers": 2, "model.init.num_heads": 4, "model.init.num_kv_heads": 2,
                     "model.init.head_dim": 8, "train.steps": 2, "train.batch_size": 8,
                     "train.seq_len": 32, "train.warmup_steps": 1, "eval.every": 0, "checkpoint.every": 2},
        warmup={"model.init.hidden_size": 32, "model.init.intermediate_size": 64,
                "model.init.num_layers": 2, "model.init.num_heads": 4, "model.init.num_kv_heads": 2,
                "model.init.head_dim": 8, "train.steps": 2, "train.batch_size": 8,
                "train.seq_len": 32, "train.warmup_steps": 1, "eval.every": 0, "checkpoint.every": 2},
        pretrain_short={"model.init.hidden_size": 32, "model.init.intermediate_size": 64,
                        "model.init.num_layers": 2, "model.init.num_heads": 4, "model.init.num_kv_heads": 2,
                        "model.init.head_dim": 8, "train.steps": 4, "train.batch_size": 8,
                        "train.seq_len": 32, "train.warmup_steps": 1, "eval.every": 2,
                        "eval.examples": 2, "checkpoint.every": 2},
        pretrain={"model.init.hidden_size": 32, "model.init.intermediate_size": 64, "model.init.num_layers": 2,
                  "model.init.num_heads": 4, "model.init.num_kv_heads": 2, "model.init.head_dim": 8,
                  "train.steps": 6, "train.batch_size": 8, "train.seq_len": 64, "train.warmup_steps": 1,
                  "eval.every": 3, "eval.examples": 2, "checkpoint.every": 3},
        more_docs=100,
        pretrain_more={"model.init.hidden_size": 32, "model.init.intermediate_size": 64, "model.init.num_layers": 2,
                       "model.init.num_heads": 4, "model.init.num_kv_heads": 2, "model.init.head_dim": 8,
                       "train.steps": 2, "train.batch_size": 8, "train.seq_len": 64, "train.warmup_steps": 1,
                       "eval.every": 0, "checkpoint.every": 2},
        retrofit={"model.dms.window": 4, "train.batch_size": 8, "train.seq_len": 64, "train.cr_end": 9.0,
                  "train.cr_steps": 8, "train.warmup_steps": 1, "eval.every": 2, "eval.examples": 2,
                  "checkpoint.every": 2},
        legs=((2, 2), (4, 4), (8, 8)),
        eval_args=["--length", "63", "--examples", "2", "--tasks", "niah_single,mqar", "--baselines", "streaming"],
        eval_legs=(8,),
    ),
}


class StageError(RuntimeError):
    pass


def _done(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json")) if os.path.isdir(path) else os.path.exists(path)


def stage_tokenizer(out, preset):
    from dms_jax.eval.tokenizer import save_tokenizer

    path = os.path.join(out, "tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_tokenizer(tmp)
        os.replace(tmp, path)


def stage_corpus(out, preset):
    import dms_jax
    from dms_jax.eval.corpus import write_corpus

    tok_dir = os.path.join(out, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        raise StageError("stage 'corpus' needs the tokenizer: run --stages tokenizer first")
    tokenizer = dms_jax.load_tokenizer(tok_dir)
    data = os.path.join(out, "data")
    pre, ret = os.path.join(data, "pretrain.jsonl"), os.path.join(data, "retrofit.jsonl")
    if not os.path.exists(pre):  # two shards (seeds 1 and 2) written in parallel, then joined
        half = preset["pretrain_docs"] // 2
        shards = [f"{pre}.shard{seed}" for seed in (1, 2)]
        # spawned, not forked: this process has JAX's threads running, and a fork copies their locks
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(write_corpus, shard, tokenizer, num_docs=half, lengths=preset["doc_lengths"],
                                mix=TASK_MIX, seed=seed) for seed, shard in zip((1, 2), shards)]
            for job in jobs:
                job.result()
        with open(pre + ".tmp", "wb") as f:
            for shard in shards:
                with open(shard, "rb") as part:
                    shutil.copyfileobj(part, f)
        os.replace(pre + ".tmp", pre)
        for shard in shards:
            os.remove(shard)
    short = os.path.join(data, "short.jsonl")
    if not os.path.exists(short):  # the first pretraining phase: one short length
        write_corpus(short, tokenizer, num_docs=preset["short_docs"], lengths=(preset["short_length"],),
                     mix=TASK_MIX, seed=4)
    for name, mix, seed in (("warmup_cwe", WARMUP_CWE_MIX, 6), ("warmup", WARMUP_MIX, 5)):
        warm = os.path.join(data, f"{name}.jsonl")
        if not os.path.exists(warm):  # the warm-ups: the short length
            write_corpus(warm, tokenizer, num_docs=preset["warmup_docs"], lengths=(preset["short_length"],),
                         mix=mix, seed=seed)
    more = os.path.join(data, "pretrain_more.jsonl")
    if not os.path.exists(more):  # the last pretraining phase: its own seed
        write_corpus(more, tokenizer, num_docs=preset["more_docs"], lengths=preset["doc_lengths"],
                     mix=PRETRAIN_MORE_MIX, seed=7)
    if not os.path.exists(ret):
        write_retrofit_corpus(ret, tokenizer, preset)


def write_retrofit_corpus(path, tokenizer, preset, mix=RETROFIT_MIX):
    """The retrofit's documents: its own seed, one length (scripts/retrofit_variant.py reweights
    `mix`)."""
    from dms_jax.eval.corpus import write_corpus

    write_corpus(path, tokenizer, num_docs=preset["retrofit_docs"], lengths=(preset["retrofit_length"],),
                 mix=mix, seed=3)


def _config(name: str, out: str, run: str, overrides: dict):
    """configs/NAME.py with the run's paths under `out` and the preset's overrides."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    paths = {"data.tokenizer": os.path.join(out, "tokenizer"),
             "checkpoint.dir": os.path.join(out, run, "checkpoints"), "output.dir": os.path.join(out, run),
             "output.progress": sys.stderr.isatty() or bool(os.environ.get("DMS_PROGRESS"))}
    for dotted, value in {**paths, **overrides}.items():
        section, _, field = dotted.rpartition(".")
        node = config
        for part in section.split("."):
            node = node[part]
        node[field] = value
    return config


def _train(stage: str, config) -> None:
    from dms_jax.train import train

    print(f"[{stage}] train.steps={config.train.steps} -> {config.output.export_dir}", flush=True)
    try:
        train(config)
    except Exception as err:  # noqa: BLE001 - any failure: name the stage to rerun
        raise StageError(f"stage {stage!r} failed ({type(err).__name__}: {err}); the earlier stages' "
                         f"artefacts are intact: fix the cause and rerun with --stages {stage}") from err


def _pretrain_phase(out, preset, stage: str, data: str, export: str, previous: tuple | None) -> None:
    """One pretraining phase: `configs/recall_pretrain.py` on data/`data`, exported to `export`,
    continuing the model of `previous` = (its stage, its export) when given."""
    export = os.path.join(out, export)
    if _done(export):
        return
    overrides = {"data.path": os.path.join(out, "data", data), "output.export_dir": export}
    if previous is not None:
        before, before_export = previous
        if not _done(os.path.join(out, before_export)):
            raise StageError(f"stage {stage!r} continues the {before} model: run --stages {before} first")
        overrides["model.path"] = os.path.join(out, before_export)
    _train(stage, _config("recall_pretrain", out, stage, {**overrides, **preset[stage]}))


def stage_warmup_cwe(out, preset):
    """Phase 0a: `cwe` and `repeat` 1:1 from a random model (short rows)."""
    _pretrain_phase(out, preset, "warmup_cwe", "warmup_cwe.jsonl", "vanilla_warmup_cwe", None)


def stage_warmup(out, preset):
    """Phase 0b: the induction circuit, `repeat` and `cwe` 3:1 (short rows)."""
    _pretrain_phase(out, preset, "warmup", "warmup.jsonl", "vanilla_warmup", ("warmup_cwe", "vanilla_warmup_cwe"))


def stage_pretrain_short(out, preset):
    """Phase 1: short rows of every task, from the warmed-up model."""
    _pretrain_phase(out, preset, "pretrain_short", "short.jsonl", "vanilla_short", ("warmup", "vanilla_warmup"))


def stage_pretrain(out, preset):
    """Phase 2: the phase-1 model continues on documents up to the full length."""
    _pretrain_phase(out, preset, "pretrain", "pretrain.jsonl", "vanilla_pretrain", ("pretrain_short", "vanilla_short"))


def stage_pretrain_more(out, preset):
    """Phase 3: fresh documents up to the full length, `niah_multivalue` and `cwe` weighted up,
    at half the learning rate: the vanilla model."""
    _pretrain_phase(out, preset, "pretrain_more", "pretrain_more.jsonl", "vanilla",
                    ("pretrain", "vanilla_pretrain"))


def stage_retrofit(out, preset):
    if not _done(os.path.join(out, "vanilla")):
        raise StageError("stage 'retrofit' needs the vanilla model: run --stages pretrain first")
    for ratio, steps in preset["legs"]:  # one schedule, exported as it passes each ratio
        export = os.path.join(out, f"dms{ratio}x")
        if _done(export):
            continue
        _train("retrofit", _config("recall_retrofit", out, "retrofit", {
            "model.path": os.path.join(out, "vanilla"), "data.path": os.path.join(out, "data", "retrofit.jsonl"),
            "train.steps": steps, "output.export_dir": export, **preset["retrofit"]}))


def stage_eval(out, preset):
    from dms_jax.eval.suite import main as eval_main

    legs = preset.get("eval_legs") or [r for r, _ in preset["legs"]]
    dms = [a for r in legs for a in ("--dms", f"{r}x={os.path.join(out, f'dms{r}x')}")]
    argv = ["--vanilla", os.path.join(out, "vanilla"), *dms, "--out", os.path.join(out, "eval"),
            *preset["eval_args"]]
    print(f"[eval] python -m dms_jax.eval {' '.join(argv)}", flush=True)
    if eval_main(argv) != 0:
        raise StageError("stage 'eval' failed (see above); the models are intact: rerun with --stages eval")


def stage_ship(out, preset):
    """Copy the vanilla and 8x models into the package and the results into docs/results."""
    from dms_jax.assets import ASSETS_DIR

    for name, src in (("recall_vanilla", "vanilla"), ("recall_dms8x", "dms8x")):
        dst = os.path.join(ASSETS_DIR, name)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(os.path.join(out, src), dst,
                        ignore=shutil.ignore_patterns("*.tmp*", ".*"))
    results = os.path.join(REPO, "docs", "results")
    os.makedirs(results, exist_ok=True)
    for f in os.listdir(os.path.join(out, "eval")):
        if f.endswith((".md", ".png", ".json")):
            shutil.copy2(os.path.join(out, "eval", f), os.path.join(results, f))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "recall"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--stages", default="all", help=f"comma-separated, from {STAGES} (default all)")
    args = parser.parse_args(argv)
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    if "ship" in stages and args.preset != "full" and args.stages == "all":
        stages = tuple(s for s in stages if s != "ship")  # only the full models ship
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    preset = PRESETS[args.preset]
    timings_path = os.path.join(out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    for stage in stages:
        tic = time.time()
        print(f"== stage {stage} ({args.preset})", flush=True)
        try:
            globals()[f"stage_{stage}"](out, preset)
        except StageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        timings[stage] = round(timings.get(stage, 0.0) + time.time() - tic, 1)
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)
    print(f"done: {', '.join(stages)}; wall seconds per stage in {timings_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
