#!/usr/bin/env bash
# Brings files left on a warm device machine back in parts under the 16 MiB file limit
# (scripts/gpu_release.sh leaves the fp16 width-64 weights there): each FILE becomes
# $OUT/<parent folder name>.<file name>.part-NN; join them here with cat.
#   run(command="bash scripts/gpu_fetch.sh runs/NAME/inference_fp16.safetensors")
#   cat FILES_AT/NAME.inference_fp16.safetensors.part-* > runs/NAME/best.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?OUT (the folder that comes back) is not set}"
for f in "$@"; do
  [ -f "$f" ] || { echo "gpu_fetch: $f is not on this machine" >&2; continue; }
  split -b 15M -d "$f" "$OUT/$(basename "$(dirname "$f")").$(basename "$f").part-"
done
ls -la "$OUT"
