"""python -m dms_jax.aot {train,decode} ...: compile for a topology and report memory per chip.

    python -m dms_jax.aot train --config configs/qwen3_8b.py --topology v5p:2x2x1
    python -m dms_jax.aot train --config configs/qwen_r1_32b.py --topology v5p:2x2x4 --suggest
    python -m dms_jax.aot decode --config configs/qwen3_8b.py --topology v5e:2x4 --context 32768 \
        --policy full,dms --target-cr 8
    python -m dms_jax.aot train --config configs/tiny.py --topology cpu:8 --mesh 1,8,1

TPU topologies (chip:bounds, e.g. v5e:4x4, v5p:2x2x4) need libtpu: pip install -e ".[aot]".
cpu:N compiles for N simulated CPU devices (no extra needed). Exit status: 0 when the program fits
(every policy's batch, or one suggestion), 1 when it does not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

from dms_jax.aot.topology import cpu_count_of, simulate_cpu_devices


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dms_jax.aot", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--topology", required=True,
                       help="a TPU topology libtpu accepts (v5e:2x2, v5p:2x2x4, ...) or cpu:N")
        p.add_argument("--mesh", default=None, help="(data, fsdp, tensor), e.g. 1,-1,2 (default: the recipe's)")
        p.add_argument("--hbm-gib", type=float, default=None,
                       help="memory per chip in GiB (default: the chip's HBM; CPU: free RAM / N)")
        p.add_argument("--json", default=None, help="also write the results to this JSON file")

    train = sub.add_parser("train", help="compile the retrofit train step", allow_abbrev=False)
    train.add_argument("--config", required=True, help="a training config, configs/<recipe>.py")
    common(train)
    train.add_argument("--batch", type=int, default=None, help="global batch (default: the recipe's)")
    train.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the recipe's)")
    train.add_argument("--remat", choices=("on", "off"), default=None, help="default: the recipe's")

    def scan_flag(p):
        p.add_argument("--scan-layers", choices=("on", "off"), default=None,
                       help="layers stacked under lax.scan (one compiled layer body) or unrolled; default: "
                            "the recipe's model.scan_layers (on in the reference recipes), off for --model-config")

    scan_flag(train)
    train.add_argument("--suggest", action="store_true",
                       help="search mesh shapes and remat settings (one compile each) for ones that fit")
    train.add_argument("--max-trials", type=int, default=6, help="compiles --suggest may spend")

    decode = sub.add_parser("decode", help="compile prefill and decode; the largest batch that fits",
                            allow_abbrev=False)
    source = decode.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a training config (its model)")
    source.add_argument("--model-config", help="a model directory, its config.json, or a hub id shipped")
    common(decode)
    decode.add_argument("--context", type=int, default=32768, help="tokens per row the cache takes")
    decode.add_argument("--policy", default="full,dms", help="full, dms, or both (comma-separated)")
    decode.add_argument("--target-cr", type=float, default=8.0, help="the CR a dms cache is sized for")
    decode.add_argument("--margin", type=float, default=None,
                        help="dms capacity margin (default: the plan's, 0.5 for slots, 0.1 for a paged pool)")
    decode.add_argument("--layout", choices=("slots", "paged"), default="slots",
                        help="the cache layout; paged: a pool per device shared by its streams")
    decode.add_argument("--chunk-size", type=int, default=512, help="prefill chunk")
    decode.add_argument("--batch", type=int, default=None, help="rows (default: data x fsdp shards)")
    decode.add_argument("--dtype", default="bfloat16", help="compute and weight dtype")
    scan_flag(decode)
    decode.add_argument("--no-search", action="store_true", help="only the given batch, no largest-batch search")
    decode.add_argument("--max-compiles", type=int, default=8, help="compiles the batch search may spend")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        count = cpu_count_of(args.topology)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if count is not None:
        simulate_cpu_devices(count)  # before anything starts JAX's backends
    from dms_jax.aot import cli_run

    return cli_run.run(args)


if __name__ == "__main__":
    sys.exit(main())
