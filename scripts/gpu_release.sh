#!/usr/bin/env bash
# One device call that trains a release candidate on the lent GPU and brings back what the
# CPU needs to finish the release: the run's best weights (inference heads, fp16, in zlib
# parts under the 16 MiB file limit), metrics.csv and summary.json.
#
# Prepare here (the working tree that travels is limited to 64 MiB):
#   python scripts/pack_data.py --out .gpu/data            # about 35 MiB
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .gpu/whl \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   (the versions of .venv here; the device image has no pydantic)
#   mv mtl_model/weights/ctmtl-release.safetensors /tmp/   # 61.5 MiB; put it back after
# Call: run(command="bash scripts/gpu_release.sh config/train/release_gpu_realct.toml",
#           carry=[".gpu"], timeout_s=600)
# Back here: python scripts/gpu_unpack.py FILES_AT/run --out runs/NAME, then
#   ctmtl-train export --checkpoint runs/NAME/best.safetensors --version ... (from the
#   original data, on the CPU), ctmtl-node evaluate --series config/eval/shared_series.csv.
# A dry run on the CPU: DEVICE=cpu MAX_MINUTES=0.2 OUT=/tmp/out bash scripts/gpu_release.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: gpu_release.sh CONFIG.toml}"
OUT="${OUT:?OUT (the folder that comes back) is not set}"
export PYTHONUNBUFFERED=1 CTMTL_DATA="$PWD/.gpu/data"
PY=python3
if [ -d .gpu/whl ] && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
name="$(basename "$CONFIG" .toml)"
run="runs/$name"
extra=()
[ -n "${MAX_MINUTES:-}" ] && extra+=(--max-minutes "$MAX_MINUTES")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt" || true
$PY -m training.cli fit --config "$CONFIG" --out "$run" --device "${DEVICE:-cuda}" \
  --no-progress "${extra[@]}" 2>&1 | tee "$OUT/fit.log" | grep -E "epoch [0-9]+:|training|stopped|error" || true
cp "$run/metrics.csv" "$run/summary.json" "$OUT/" 2>/dev/null || true
mkdir -p "$OUT/run"
$PY - "$run/best.safetensors" "$OUT/run" <<'PY'
"""Inference heads of the best checkpoint, fp16, as zlib parts below 15 MiB each."""
import sys, zlib
from pathlib import Path
import torch
from mtl_model import load_checkpoint, save_checkpoint
from training.export import INFERENCE_TASKS
src, out = Path(sys.argv[1]), Path(sys.argv[2])
model, meta = load_checkpoint(src)
keep = [t for t in meta.architecture.tasks if t in INFERENCE_TASKS]
tmp = out.parent / "best_fp16.safetensors"
save_checkpoint(model, meta, tmp, dtype=torch.float16, tasks=keep)
data = zlib.compress(tmp.read_bytes(), 6)
tmp.unlink()
part = 15 * 2**20
for i in range(0, len(data), part):
    (out / f"best.{i // part:02d}.zlib").write_bytes(data[i : i + part])
print(f"{src}: {len(data) / 2**20:.1f} MiB compressed in {-(-len(data) // part)} parts")
PY
ls -la "$OUT" "$OUT/run"
