"""Unpack what scripts/gpu_release.sh brought back: runs.tgz.part-NN -> runs/NAME/...

python scripts/gpu_unpack.py FILES_AT --out runs/

Each run gets its folder with best.safetensors (inference heads), metrics.csv, summary.json
and fit.log; every checkpoint is read back (a readable, self-describing file, or an error).
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

from mtl_model import read_metadata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", type=Path, help="folder with runs.tgz.part-NN")
    ap.add_argument("--out", type=Path, required=True, help="folder for the runs (runs/)")
    args = ap.parse_args()
    parts = sorted(args.parts.glob("runs.tgz.part-*"))
    if not parts:
        raise SystemExit(f"no runs.tgz.part-NN in {args.parts}")
    args.out.mkdir(parents=True, exist_ok=True)
    data = b"".join(p.read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(args.out, filter="data")
    for ckpt in sorted(args.out.glob("*/best.safetensors")):
        meta = read_metadata(ckpt)
        print(f"{ckpt}: {meta.model_version}, heads {meta.architecture.tasks}")


if __name__ == "__main__":
    main()
