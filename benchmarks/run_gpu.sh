#!/usr/bin/env bash
# One GPU session's checks and benchmarks, in one command (a lent GPU machine is short-lived and bare).
#
# Prepared on the development machine (none of it is committed; .gpu/ and .whl/ are git-ignored):
#   python benchmarks/bench_e2e_realsize.py --frames 16 --save-inputs .gpu/inputs.safetensors --skip-lerobot
#   python scripts/checkpoint_manifest.py manifest /tmp/real_ckpt .gpu/real_ckpt     # layout, no weights
#   cp -r /tmp/real_vlm .gpu/real_vlm                  # VLM config + tokenizer of the checkpoint
#   mkdir -p .gpu/kit && cp ../shared/lerobot_reference/scripts/crop_shim.py .gpu/kit/
#   pip download --no-deps ... -d .whl lerobot==0.6.1 draccus==0.11.6 mergedeep==1.3.4 gymnasium==1.4.0 \
#       farama-notifications==0.0.6 toml==0.10.2 num2words==0.5.14   # LeRobot for the GPU machine's Python 3.12
# On the GPU machine (its own torch / transformers; carry .gpu and .whl): bash benchmarks/run_gpu.sh
#
# Writes to $OUT: machine.txt, tests.log (test/test_cuda_graphs.py: the captures equal eager on CUDA),
# e2e_gpu.{log,json} (bench_e2e_realsize.py on CUDA: LeRobot 0.6.1 eager fp32 / VLM-bf16 in the same run,
# ours eager and cudagraph, all off and compression on), e2e_compiled.{log,json} (cudagraph and
# cudagraph_compiled in bf16 beside LeRobot fp32), e2e_compiled5.{log,json} (the same, 5 denoising steps on).
# STEPS="tests e2e compiled compiled5" (default: all) picks steps; each has its own time limit, so a failing
# step leaves the others' results.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
FRAMES=${FRAMES:-12}
WARMUP=${WARMUP:-3}
TARGET=${TARGET:-orin_nx_16gb}
DEVICE=${DEVICE:-cuda}          # DEVICE=cpu: a dry run of the same steps (slow at real size)
LR_PY=${LR_PY:-$PY}             # the LeRobot subprocess's Python (with /tmp/lrsite on its path)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log() { echo "## $(date +%T) $*"; }

log machine
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  lscpu | grep -E "^Model name|^CPU\(s\)"
  $PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/machine.txt"

log "LeRobot wheels (for its subprocess only)"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-requires-python --target /tmp/lrsite .whl/*.whl 2>&1 | tail -3

log "checkpoint: the real-size layout, weights drawn per tensor"
CKPT=${CKPT:-/tmp/gpu_ckpt}
[ -d /tmp/real_vlm ] || cp -r .gpu/real_vlm /tmp/real_vlm   # the checkpoint's configs name this path
rm -rf "$CKPT" && cp -r .gpu/real_ckpt "$CKPT"
$PY scripts/checkpoint_manifest.py materialize "$CKPT"

want() { [[ " ${STEPS:-tests e2e compiled compiled5} " == *" $1 "* ]]; }
common=(--device "$DEVICE" --checkpoint "$CKPT" --inputs .gpu/inputs.safetensors --frames "$FRAMES"
        --warmup "$WARMUP" --threads 8 --target "$TARGET")
lerobot=(--lerobot-python "$LR_PY" --lerobot-pythonpath /tmp/lrsite --kit-scripts .gpu/kit)
bench() {  # NAME TIMEOUT ARGS...: bench_e2e_realsize.py -> $OUT/NAME.{log,json}
  local name=$1 limit=$2; shift 2
  log "end-to-end: $name"
  timeout "$limit" $PY benchmarks/bench_e2e_realsize.py "${common[@]}" "$@" --json "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  grep -v "^\[" "$OUT/$name.log" | grep -v "^  \|^Traceback" | tail -40
}

if want tests; then
  log "tests on CUDA"
  timeout 150 $PY -m pytest -q -p no:cacheprovider test/test_cuda_graphs.py 2>&1 | tee "$OUT/tests.log" | tail -30
fi
# eager and cudagraph, fp32 and bf16, LeRobot fp32 and VLM-bf16; "on" = the target's compression as configured
want e2e && bench e2e_gpu 270 --backends eager,cudagraph --dtypes fp32,bf16 --lerobot-dtypes fp32,vlm-bf16 "${lerobot[@]}"
# graphs over compiled layers, bf16; "on" = pruning + frame-level reuse (the patch-level partial encode is eager)
want compiled && bench e2e_compiled 200 --backends cudagraph,cudagraph_compiled --dtypes bf16 --lerobot-dtypes fp32 \
  "${lerobot[@]}" --expert-reuse-fraction 0 --on-set reuse.patch_level=false
# the same with 5 denoising steps in "on" (x86_cpu's count)
want compiled5 && bench e2e_compiled5 150 --backends cudagraph_compiled --dtypes bf16 --skip-lerobot \
  --expert-reuse-fraction 0 --on-set reuse.patch_level=false --on-set inference.num_steps=5
log done
