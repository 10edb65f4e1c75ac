"""What `python -m dms_jax.aot` does once JAX may start: check the input, compile, print."""
from __future__ import annotations

import dataclasses
import json
import sys

from dms_jax import sharding as shd
from dms_jax.aot.memory import MemoryReport
from dms_jax.aot.programs import BatchError, DecodeSettings, TrainSettings, compile_decode, compile_train
from dms_jax.aot.search import BatchPoint, largest_batch, suggest_train
from dms_jax.aot.shapes import model_config_for_recipe, model_config_from_file
from dms_jax.aot.topology import TopologyError, chip_memory, describe, devices_for, parse_mesh
from dms_jax.plan import PlanError
from dms_jax.stats import format_bytes

INPUT_ERRORS = (TopologyError, BatchError, shd.MeshError, PlanError, FileNotFoundError)


def run(args) -> int:
    try:
        devices = devices_for(args.topology)
        limit = chip_memory(devices, args.hbm_gib)
        mesh = parse_mesh(args.mesh) if args.mesh else None
        if args.command == "train":
            return _train(args, devices, limit, mesh)
        return _decode(args, devices, limit, mesh)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _header(what: str, args, devices, limit):
    hbm = format_bytes(limit) if limit is not None else "unknown"
    print(f"{what} on {args.topology} ({describe(devices)}, {hbm} per chip)", flush=True)


def _load_recipe(path: str):
    from dms_jax.train import cli

    config = cli.load_config_file(path)
    if config is None:
        raise FileNotFoundError(f"--config {path}: not a loadable config file (configs/<recipe>.py with get_config())")
    return config


def _train(args, devices, limit, mesh) -> int:
    config = _load_recipe(args.config)
    settings = TrainSettings(mesh_shape=mesh, remat=None if args.remat is None else args.remat == "on",
                             scan_layers=None if args.scan_layers is None else args.scan_layers == "on",
                             batch_size=args.batch, seq_len=args.seq_len)
    from dms_jax.aot.programs import _with_overrides

    config = _with_overrides(config, settings)
    t = config.train
    cfg = model_config_for_recipe(config)
    _header(f"train step of {args.config} ({cfg.num_layers} layers, d {cfg.hidden_size}; batch "
            f"{t.batch_size} x {t.seq_len} tokens; trains {t.trainable}; remat {bool(t.remat)}; layers "
            f"{'scanned' if cfg.scan_layers else 'unrolled'})", args, devices, limit)
    if args.suggest:
        return _suggest(args, config, devices, limit, cfg.num_kv_heads)
    report = compile_train(config, devices, limit=limit, topology=args.topology)
    print(f"mesh {tuple(config.mesh.shape)} (data, fsdp, tensor); bytes per chip:")
    print(report.table())
    _write_json(args.json, {"command": "train", "config": args.config, "topology": args.topology,
                            "mesh": list(config.mesh.shape), "remat": bool(t.remat),
                            "scan_layers": cfg.scan_layers, **_report_dict(report)})
    return 0 if report.fits is not False else 1


def _suggest(args, config, devices, limit, kv_heads) -> int:
    def show(trial):
        r = trial.report
        what = trial.error if r is None else (f"total {format_bytes(r.total)} per chip, "
                                              f"{'fits' if r.fits else 'does not fit'}; compile {r.compile_s:.1f} s")
        print(f"  mesh {trial.mesh} remat {'on' if trial.remat else 'off'}: {what}", flush=True)

    trials = suggest_train(config, devices, kv_heads=kv_heads, limit=limit, topology=args.topology,
                           max_trials=args.max_trials, on_trial=show)
    fitting = [t for t in trials if t.report is not None and t.report.fits]
    if fitting:
        best = min(fitting, key=lambda t: t.report.total)
        print(f"fits: --mesh {','.join(map(str, best.mesh))} --remat {'on' if best.remat else 'off'} "
              f"({format_bytes(best.report.total)} per chip)")
    else:
        print(f"nothing tried fits in {format_bytes(limit) if limit else 'the chip'}: try a larger topology, a smaller "
              "--batch or --seq-len")
    _write_json(args.json, {"command": "train-suggest", "config": args.config, "topology": args.topology, "trials": [
        {"mesh": list(t.mesh), "remat": t.remat, "error": t.error, **(_report_dict(t.report) if t.report else {})}
        for t in trials]})
    return 0 if fitting else 1


def _decode(args, devices, limit, mesh) -> int:
    if args.config:
        config = _load_recipe(args.config)
        cfg = model_config_for_recipe(config)
        cfg = cfg.replace(dtype=args.dtype, param_dtype=args.dtype)
        mesh = mesh or tuple(config.mesh.shape)
    else:
        cfg = model_config_from_file(args.model_config, dtype=args.dtype, param_dtype=args.dtype)
        mesh = mesh or (1, -1, 1)
    if args.scan_layers is not None:
        cfg = cfg.replace(scan_layers=args.scan_layers == "on")
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    for p in policies:
        if p not in ("full", "dms"):
            raise PlanError(f"--policy {p}: use full, dms or full,dms")
    _header(f"decode of {args.config or args.model_config} ({cfg.num_layers} layers "
            f"{'scanned' if cfg.scan_layers else 'unrolled'}, {cfg.num_kv_heads} KV heads of {cfg.head_dim}, "
            f"{args.dtype}) at {args.context} tokens per row", args, devices, limit)
    from dms_jax.aot.search import _row_granularity

    base = DecodeSettings(batch=1, context=args.context, target_cr=args.target_cr, margin=args.margin,
                          chunk_size=args.chunk_size, mesh_shape=tuple(mesh), layout=args.layout)
    step = _row_granularity(devices, base, args.topology)
    batch = args.batch or step
    results, ok = {}, True
    for policy in policies:
        settings = dataclasses.replace(base, batch=batch, policy=policy)
        out = compile_decode(cfg, devices, settings, limit=limit, topology=args.topology)
        print(f"{policy} ({args.layout} cache of {out['capacity']} tokens per head), batch {batch}, "
              f"mesh {tuple(mesh)}:", flush=True)
        for name in ("prefill", "decode"):
            print(f" {name} (chunk {min(args.chunk_size, args.context)})" if name == "prefill" else f" {name}")
            print(out[name].table(), flush=True)
        entry = {"batch": batch, "capacity": out["capacity"], "prefill": _report_dict(out["prefill"]),
                 "decode": _report_dict(out["decode"])}
        ok &= all(out[n].fits is not False for n in ("prefill", "decode"))
        if not args.no_search and limit is not None:
            found = largest_batch(cfg, devices, settings, limit=limit, topology=args.topology,
                                  max_compiles=args.max_compiles,
                                  known=[BatchPoint(batch, out["prefill"], out["decode"])],
                                  on_point=lambda p: print(f"  batch {p.batch}: {_point_text(p)}", flush=True))
            measured = ", ".join(f"{p.batch}: {format_bytes(p.total) if p.error == '' else 'compiler out of memory'}"
                                 for p in found.points)
            how = ("its next step does not" if found.exact else
                   f"not bracketed within --max-compiles {args.max_compiles}; the line through the compiles "
                   f"predicts {found.predicted}")
            print(f" largest batch that fits: {found.best} ({how}; bytes per chip by batch: {measured})")
            entry.update(largest_batch=found.best, predicted_batch=found.predicted, exact=found.exact,
                         points={p.batch: None if p.error else p.total for p in found.points},
                         refused={p.batch: p.error for p in found.points if p.error})
        results[policy] = entry
    if {"full", "dms"} <= set(results) and "largest_batch" in results["full"]:
        full, dms = results["full"]["largest_batch"], results["dms"]["largest_batch"]
        print(f"largest batch dms / full: {dms} / {full}" + (f" = {dms / full:.2f}x" if full else ""))
    _write_json(args.json, {"command": "decode", "model": args.config or args.model_config,
                            "scan_layers": cfg.scan_layers,
                            "topology": args.topology, "mesh": list(mesh), "context": args.context,
                            "target_cr": args.target_cr, "margin": args.margin, "layout": args.layout,
                            "policies": results})
    return 0 if ok else 1


def _point_text(p) -> str:
    if p.error:
        return f"does not fit: the compiler ran out of memory ({p.error})"
    return (f"prefill {format_bytes(p.prefill.total)}, decode {format_bytes(p.decode.total)} per chip (compile "
            f"{p.prefill.compile_s + p.decode.compile_s:.0f} s)")


def _report_dict(report: MemoryReport) -> dict:
    return {**dataclasses.asdict(report), "total": report.total, "fits": report.fits}


def _write_json(path, payload) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
