#!/usr/bin/env bash
# One device call that trains one or more release candidates side by side on the lent GPU
# and brings back what the CPU needs to finish the release: each run's best weights
# (inference heads), metrics.csv, summary.json and fit log, in one tar.gz cut into parts
# under the 16 MiB file limit. What comes back is capped (8 files, 64 MiB): a network over
# 16 MiB travels as fp16 inference heads (width-64 U-Net: 61.5 MiB, about 55 MiB gzipped);
# if the whole would pass 62 MiB, those heads stay on the device as
# runs/NAME/inference_fp16.safetensors, for a next call on the still-warm machine to bring
# back with scripts/gpu_fetch.sh.
#
# Prepare here (the working tree that travels is limited to 64 MiB):
#   python scripts/pack_data.py --out .gpu/data --cut      # about 49 MiB
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .gpu/whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   (the versions of .venv here; the device image has no pydantic)
#   mv mtl_model/weights/ctmtl-release.safetensors /tmp/   # 61.5 MiB; put it back after
# Call: run(command="MAX_MINUTES=6 bash scripts/gpu_release.sh config/train/A.toml B.toml",
#           carry=[".gpu"], timeout_s=600)
# The runs share the GPU (a width-64 U-Net step leaves most of an H100/H200 idle) and the
# host's cores (each config's train.cpu_threads).
# Back here: python scripts/gpu_unpack.py FILES_AT --out runs/, then
#   ctmtl-train export --checkpoint runs/NAME/best.safetensors --version ... (from the
#   original data, on the CPU), ctmtl-node evaluate --series config/eval/shared_series.csv.
# A dry run on the CPU: DEVICE=cpu MAX_MINUTES=0.2 OUT=/tmp/out bash scripts/gpu_release.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: gpu_release.sh CONFIG.toml[@SEED] [CONFIG.toml[@SEED] ...]" >&2; exit 2; }
OUT="${OUT:?OUT (the folder that comes back) is not set}"
export PYTHONUNBUFFERED=1 CTMTL_DATA="${CTMTL_DATA:-$PWD/.gpu/data}"
PY=python3
if [ -d .gpu/whl ] && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
extra=()
[ -n "${MAX_MINUTES:-}" ] && extra+=(--max-minutes "$MAX_MINUTES")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt" || true
stage="$(mktemp -d)"
pids=()
names=()
for spec in "$@"; do
  # CONFIG.toml@SEED trains that config with another seed, as run NAME_sSEED
  config="${spec%@*}"
  name="$(basename "$config" .toml)"
  seed=()
  if [ "$spec" != "$config" ]; then name="${name}_s${spec##*@}"; seed=(--seed "${spec##*@}"); fi
  mkdir -p "$stage/$name"
  $PY -m training.cli fit --config "$config" --out "runs/$name" --device "${DEVICE:-cuda}" \
    --no-progress "${extra[@]}" "${seed[@]}" >"$stage/$name/fit.log" 2>&1 &
  pids+=($!)
  names+=("$name")
done
status=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "${names[$i]}: fit done"
  else
    echo "${names[$i]}: fit failed (exit $?)"; status=1
  fi
  grep -E "epoch [0-9]+:|stopped|error|Error" "$stage/${names[$i]}/fit.log" | tail -3 || true
done
for name in "${names[@]}"; do
  cp "runs/$name/metrics.csv" "runs/$name/summary.json" "$stage/$name/" 2>/dev/null || true
done
$PY - "$stage" "${names[@]}" <<'PY'
"""The inference heads of each run's best checkpoint (fp16 above 16 MiB), into the stage."""
import sys
from pathlib import Path

import torch

from mtl_model import load_checkpoint, save_checkpoint
from training.export import INFERENCE_TASKS

stage = Path(sys.argv[1])
for name in sys.argv[2:]:
    src = Path("runs") / name / "best.safetensors"
    if not src.is_file():
        print(f"{name}: no best.safetensors")
        continue
    model, meta = load_checkpoint(src)
    keep = [t for t in meta.architecture.tasks if t in INFERENCE_TASKS]
    big = sum(p.numel() for p in model.parameters()) * 4 > 16 * 2**20
    dst = stage / name / "best.safetensors"
    save_checkpoint(model, meta, dst, dtype=torch.float16 if big else torch.float32, tasks=keep)
    if big:  # a copy stays on the device for gpu_fetch.sh
        (src.parent / "inference_fp16.safetensors").write_bytes(dst.read_bytes())
    print(f"{name}: {dst.stat().st_size / 2**20:.1f} MiB {'fp16' if big else 'fp32'} {keep}")
PY
tar -C "$stage" -cf - . | gzip -9 >"$stage.tgz"
if [ "$(stat -c %s "$stage.tgz")" -gt $((62 * 1048576)) ]; then
  echo "over 62 MiB gzipped: the fp16 heads stay in runs/*/inference_fp16.safetensors"
  for name in "${names[@]}"; do
    if [ -f "runs/$name/inference_fp16.safetensors" ]; then rm -f "$stage/$name/best.safetensors"; fi
  done
  tar -C "$stage" -cf - . | gzip -9 >"$stage.tgz"
fi
split -b 15M -d "$stage.tgz" "$OUT/runs.tgz.part-"
ls -la "$OUT"
exit $status
