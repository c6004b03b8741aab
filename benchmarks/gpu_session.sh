#!/usr/bin/env bash
# The GPU numbers docs/benchmarks.md is missing (issues 3 and 4), in stages that each fit a
# 10-minute call on a lent machine that has JAX + CUDA and no network.
#
#   bash benchmarks/gpu_session.sh wheels PYVER   # here, with PyPI: wheels the device lacks -> .whl/
#   bash benchmarks/gpu_session.sh STAGE          # on the device (carry .whl), STAGE one of:
#     env        device, versions, imports
#     tests [PYTEST ARGS]  the kernel and model tests with the kernels compiled (Triton; the TPU
#                kernels' interpret-mode cases are left to CPU CI); default tests/pallas_kernels
#                tests/model (about 6 s per compiled case: give a file or -k to fit 10 minutes)
#     attention [ARGS]  benchmarks/attention.py (V4-Flash shapes, kernels vs the XLA references; the
#                full table took 9 min on an H100: split it, e.g. --kinds csa,hca then --kinds window,indexer;
#                --prefill / --decode pick rows, --tiles times other Triton tiles beside the defaults)
#     moe [ARGS]   benchmarks/moe.py (grouped matmul vs ragged_dot)
#     head [ARGS]  benchmarks/head.py (the loss's head per train.head_precision)
#     train [KEY=VALUE ...]  configs/small.yaml (with those overrides) for TRAIN_STEPS steps (default 30):
#                tokens/s, MFU and compile time
#
# Each stage writes STAGE.log (and train: metrics.jsonl) under $OUT (default runs/gpu).
# SMOKE=1 runs the stages at tiny sizes on any CPU (a check of this script, no timings).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?"usage: gpu_session.sh wheels PYVER | env | tests | attention | moe | head | train"}
out=${OUT:-runs/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the repository's packages, without an install
smoke=()
[[ -n "${SMOKE:-}" ]] && smoke=(--smoke)

if [[ $stage == wheels ]]; then
  # grain and the dependencies of it, tokenizers, tensorboardX and pytest, which a JAX + flax image may lack; no jax/jaxlib (the
  # device has its own). PYVER: the device's Python, e.g. 3.12 (stage env prints it).
  pyver=${2:?"give the device's Python version, e.g. 3.12"}
  python3 -m pip download -q --dest .whl --no-deps --only-binary=:all: --python-version "$pyver" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    grain array-record portpicker cloudpickle etils tokenizers tensorboardX pytest pluggy iniconfig
  du -sh .whl
  exit
fi

{
  echo "== $stage  $(date -u +%FT%TZ)"
  if [[ -d .whl ]]; then  # only what the image lacks, offline, without touching what it has
    for pair in grain:grain array_record:array_record portpicker:portpicker cloudpickle:cloudpickle \
                etils:etils tokenizers:tokenizers tensorboardx:tensorboardX pytest:pytest pluggy:pluggy \
                iniconfig:iniconfig; do
      python -c "import ${pair#*:}" 2>/dev/null ||
        python -m pip install -q --no-index --no-deps .whl/"${pair%%:*}"-*.whl 2>&1 | tail -2
    done
  fi
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
      python -V
      python - <<'EOF'
import importlib
for m in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "chex", "tokenizers", "tensorboardX",
          "triton", "ml_dtypes", "yaml", "tqdm"):
    try:
        print(f"{m:18s}", getattr(importlib.import_module(m), "__version__", "ok"))
    except Exception as e:  # noqa: BLE001 - report every missing module, not the first
        print(f"{m:18s} MISSING ({type(e).__name__}: {e})")
import jax
print("devices:", jax.devices())
EOF
      ;;
    tests)
      args=("${@:2}")
      (( ${#args[@]} )) || args=(tests/pallas_kernels tests/model)
      python -m pytest -q -rf -k "not mosaic" -p no:cacheprovider "${args[@]}" ;;
    attention)
      python benchmarks/attention.py "${smoke[@]}" "${@:2}" ;;
    moe)
      python benchmarks/moe.py "${smoke[@]}" "${@:2}" ;;
    head)
      python benchmarks/head.py "${smoke[@]}" "${@:2}" ;;
    train)
      cfg=configs/small.yaml
      [[ -n "${SMOKE:-}" ]] && cfg=configs/tiny.yaml
      work=${TRAIN_DIR:-/tmp/v4jax-gpu-train}   # the final checkpoint stays outside $OUT (GBs)
      rm -rf "$work"
      # a second call on the same (warm) machine loads the compiled step instead of compiling it again
      export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/v4jax-xla-cache}
      # not --quiet: the log shows the phases ("compiling the training step ...", "compiled ... in N s");
      # a run stopped by TRAIN_TIMEOUT (seconds) prints where it was (faulthandler on SIGABRT)
      PYTHONFAULTHANDLER=1 timeout -s ABRT "${TRAIN_TIMEOUT:-560}" python train.py --config "$cfg" \
        --workdir "$work" "train.steps=${TRAIN_STEPS:-30}" train.log_every=5 checkpoint.every=100000 "${@:2}"
      cp "$work/metrics.jsonl" "$out/metrics.jsonl"
      python - "$out/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print({k: r.get(k) for k in ("step", "loss", "tokens_per_s", "step_time_s", "mfu", "compile_s", "step_memory_gib")})
EOF
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
} 2>&1 | tee "$out/$stage.log"
exit "${PIPESTATUS[0]}"
