#!/usr/bin/env bash
# Regenerate the policy-core golden files in test/data/golden_tiny/ with LeRobot 0.6.1 itself.
#
# usage: scripts/make_golden.sh [REFERENCE_KIT_DIR] [REFERENCE_PYTHON]
#   REFERENCE_KIT_DIR  the LeRobot reference kit (default: ../shared/lerobot_reference next to the repo)
#   REFERENCE_PYTHON   python of the kit's venv (default: ~/.cache/effvla-lerobot-ref/bin/python;
#                      build it with REFERENCE_KIT_DIR/setup.sh)
#
# Writes (a few MB, committed):
#   test/data/golden_tiny/vlm/   tiny SmolVLM directory (config + trained-offline tokenizer + processor)
#   test/data/golden_tiny/fp32/  LeRobot checkpoint (fp32) + reference.safetensors + reference_info.json
#   test/data/golden_tiny/bf16/  the same with the VLM cast to bf16 (as load_vlm_weights=True runs it)
# The checkpoints' config.json hold the absolute path of a temporary VLM dir that no longer exists:
# tests pass test/data/golden_tiny/vlm explicitly (as a user passes --vlm-dir).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="${1:-$REPO/../shared/lerobot_reference}"
PY="${2:-$HOME/.cache/effvla-lerobot-ref/bin/python}"
OUT="$REPO/test/data/golden_tiny"
[ -f "$KIT/scripts/build_reference.py" ] || { echo "reference kit not found at $KIT" >&2; exit 2; }
[ -x "$PY" ] || { echo "reference python not found at $PY (run $KIT/setup.sh)" >&2; exit 2; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" "$KIT/scripts/make_tiny_vlm.py" "$TMP/tiny_vlm" >/dev/null
"$PY" "$KIT/scripts/build_reference.py" --vlm-dir "$TMP/tiny_vlm" --out "$TMP/fp32" >/dev/null
"$PY" "$KIT/scripts/build_reference.py" --vlm-dir "$TMP/tiny_vlm" --out "$TMP/bf16" --vlm-bf16 >/dev/null
rm -rf "$OUT/vlm" "$OUT/fp32" "$OUT/bf16"
mkdir -p "$OUT"
cp -r "$TMP/tiny_vlm" "$OUT/vlm"
cp -r "$TMP/fp32" "$OUT/fp32"
cp -r "$TMP/bf16" "$OUT/bf16"
du -sh "$OUT"
echo "golden files written to $OUT"
