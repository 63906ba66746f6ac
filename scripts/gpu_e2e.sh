#!/usr/bin/env bash
# One device call that runs the node end to end on the lent GPU (benchmarks/e2e.py: C-STORE
# in, lung mask, inference, SEG + SR, C-STORE out to a PACS) and then the predictor
# throughput benchmark, and brings back their JSON figures and logs in $OUT.
#
# The device image has torch but none of the node's DICOM / database / config packages, no
# DCMTK (e2e.py then uses a pynetdicom PACS and sender) and no network. Prepare here (the
# working tree that travels is limited to 64 MiB):
#   .venv/bin/python scripts/pack_e2e.py      # writes .gpu2/ (about 51 MiB, ~3 min of xz):
#       site.tar.xz (the missing packages, CPython 3.12 wheels unpacked), data/ (every 5th
#       slice of the RICORD COVID-19 series, which e2e.py synthesizes its series from)
#   mv mtl_model/weights/ctmtl-release.safetensors /tmp/   # 59.4 MiB; put it back after
#       (e2e.py and predictor.py use random weights: speed does not depend on them)
# Call: run(command="bash scripts/gpu_e2e.sh", carry=[".gpu2"], timeout_s=300)
# Comes back in $OUT: gpu.txt, imports.txt, e2e_cuda.json, e2e.log, node.log, pacs.txt,
# predictor_cuda.json, predictor.log, steps.txt (each step's exit status and seconds).
# Steps are capped (e2e 150 s, predictor 45 s), so the whole script ends within 4 minutes;
# 300 slices took 110 s in all on a 2-core CPU.
# A dry run on the CPU (no DCMTK, a venv with only what the device has, see the report):
#   .venv/bin/python scripts/pack_e2e.py --python-version 3.11 --out /tmp/gpu2-311
#   DEVICE=cpu SLICES=40 CTMTL_BENCH_NO_DCMTK=1 BUNDLE=/tmp/gpu2-311 SITE=/tmp/site311 \
#     OUT=/tmp/out PY=/tmp/e2evenv/bin/python bash scripts/gpu_e2e.sh
#   (/tmp/e2evenv: a venv with only torch numpy pillow matplotlib rich tqdm
#   prometheus-client safetensors packaging markupsafe psutil, as on the device)
# Each step may fail without stopping the rest: what ran is in $OUT either way.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?OUT (the folder that comes back) is not set}"
DEVICE="${DEVICE:-cuda}"
SLICES="${SLICES:-300}"
BATCH="${BATCH:-64}"
PY="${PY:-python3}"
SITE="${SITE:-/tmp/site-e2e}"  # not /tmp/site: gpu_release.sh installs there
WORK="${WORK:-/tmp/e2ework}"
BUNDLE="${BUNDLE:-.gpu2}"  # the dry run on another CPython points this at its own pack
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: >"$OUT/steps.txt"
step() { # step NAME COMMAND...: run it, note its exit status and time
  local name="$1" t0=$SECONDS rc
  shift
  echo "== $name: $*"
  "$@"
  rc=$?
  echo "$name rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  return 0
}

unpack() {
  mkdir -p "$SITE"
  "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    "$BUNDLE/site.tar.xz" "$SITE" || tar -xJf "$BUNDLE/site.tar.xz" -C "$SITE"
}
step unpack unpack
export PYTHONPATH="$SITE:$PWD"

gpu() {
  nvidia-smi >"$OUT/gpu.txt" 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    >>"$OUT/gpu.txt" 2>&1
}
[ "$DEVICE" = cpu ] || step nvidia-smi gpu

imports() {
  "$PY" - <<'PY' 2>&1 | tee "$OUT/imports.txt"
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform(), "torch", torch.__version__,
      "cuda", torch.cuda.is_available())
for name in ("pydicom", "pynetdicom", "highdicom", "SimpleITK", "sqlalchemy", "alembic",
             "pydantic", "pylibjpeg", "libjpeg", "openjpeg", "rle", "jpeg_ls", "numpy"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"), module.__file__)
import dicom_node.cli, mtl_model.lung  # noqa: E401,F401  the node's own imports
from pydicom.pixels import get_decoder  # noqa: E402
print("JPEG Lossless decoder available:", get_decoder("1.2.840.10008.1.2.4.70").is_available)
PY
}
step imports imports

like=()  # random weights of the shipped architecture, where pack_e2e.py wrote it
[ -f "$BUNDLE/like.json" ] && like=(--like "$BUNDLE/like.json")
e2e() {
  rm -rf "$WORK"
  timeout -s INT -k 20 150 "$PY" benchmarks/e2e.py --width 64 "${like[@]}" --device "$DEVICE" \
    --batch "$BATCH" --slices "$SLICES" --data "$BUNDLE/data" --workdir "$WORK" \
    --json "$OUT/e2e_$DEVICE.json" 2>&1 | tee "$OUT/e2e.log"
  local rc=$?
  cp "$WORK/node.log" "$OUT/node.log" 2>/dev/null
  ls -la "$WORK/pacs" >"$OUT/pacs.txt" 2>&1
  return $rc
}
step e2e e2e

predictor() {
  timeout -s INT -k 10 45 "$PY" benchmarks/predictor.py --width 64 --device "$DEVICE" \
    --slices "$SLICES" --batch "$BATCH" --json "$OUT/predictor_$DEVICE.json" 2>&1 \
    | tee "$OUT/predictor.log"
}
step predictor predictor

ls -la "$OUT"
cat "$OUT/steps.txt"
