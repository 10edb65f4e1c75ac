#!/usr/bin/env bash
# The GPU figures of the README (issue 13): dms_jax against transformers, and continuous batching,
# on one CUDA device in bfloat16, on the `gqa-1b` shape of benchmarks/vs_transformers.py
# (Llama-3.2-1B's layer, 8 layers), and the experimental fused prefill kernel against the
# accelerator plan's attention. Needs jax with CUDA, torch with CUDA, transformers, flax.
#
#   bash scripts/gpu_benchmarks.sh [OUT_DIR] [SECONDS]
#
# OUT_DIR (default gpu_results/) receives the JSON records, logs and plots; SECONDS (default 3600)
# bounds the whole run: a step that would start with too little time left is skipped, and a
# step cut short keeps the configurations it finished (the records are written as they come).
# A seconds-scale smoke run (the tiny shape) goes first and stops the script if anything fails.
set -u
out=${1:-gpu_results}
budget=${2:-3600}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
left() { echo $((budget - SECONDS)); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), \
'| flax', flax.__version__, '| torch', torch.__version__, torch.cuda.get_device_name(0), \
'| transformers', transformers.__version__)" || exit 1

# smoke: every system once on the tiny shape; any error stops here
timeout "$(left)" python3 benchmarks/vs_transformers.py --device gpu --quick \
    --systems transformers,full,dms8,dms8-paged --json "$out/smoke.json" --plot "" \
    2>&1 | tee "$out/smoke.log"
python3 - "$out/smoke.json" <<'EOF' || exit 1
import json, sys
bad = [r for r in json.load(open(sys.argv[1])) if "error" in r]
for r in bad:
    print("FAILED", r["system"], "\n".join(r.get("stderr_tail", [r["error"]])))
sys.exit(1 if bad else 0)
EOF

# the experimental fused prefill kernel (Pallas) against live_attention on one layer's chunk
if (($(left) > 120)); then
  timeout 240 python3 benchmarks/fused_prefill.py --device gpu 2>&1 | tee "$out/fused_prefill_gpu.log"
fi

# side by side with transformers: prefill, decode, peak GPU memory, KV bytes
if (($(left) > 120)); then
  timeout "$(left)" python3 benchmarks/vs_transformers.py --device gpu --shapes gqa-1b \
      --contexts 8192,32768 --batches 8 --systems transformers,full,dms8,dms8-paged \
      --new-tokens 64 --repeats 3 --timeout 180 \
      --json "$out/vs_transformers_gpu.json" --plot "$out/vs_transformers_gpu.png" \
      2>&1 | tee "$out/vs_transformers_gpu.log"
fi

# the same through the experimental fused prefill kernel (slot layout)
if (($(left) > 180)); then
  timeout "$(left)" python3 benchmarks/vs_transformers.py --device gpu --shapes gqa-1b \
      --contexts 8192,32768 --batches 8 --systems transformers,full,dms8 --attention fused \
      --new-tokens 64 --repeats 3 --timeout 180 --json "$out/vs_transformers_gpu_fused.json" \
      --plot "" 2>&1 | tee "$out/vs_transformers_gpu_fused.log"
fi

# continuous batching on the same pool: full against dms 8x, prompt-heavy 16k stream
if (($(left) > 240)); then
  timeout "$(left)" python3 benchmarks/serve.py --device gpu --shape gqa-1b --context 16384 \
      --requests 8 --new-tokens 256 2>&1 | tee "$out/serve_gpu.log"
fi
# a per-op profile of a 32k `full` prefill chunk and decode step (untried on a GPU: the trace
# breakdown was written for the CPU's; kept last)
if (($(left) > 180)); then
  timeout "$(left)" python3 benchmarks/vs_transformers.py --device gpu \
      --profile gqa-1b,32768,8,full 2>&1 | tee "$out/profile_gpu.log"
fi
echo "done in $SECONDS s"
