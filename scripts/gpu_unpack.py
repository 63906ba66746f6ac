"""Join the zlib parts that scripts/gpu_release.sh brought back into one checkpoint.

python scripts/gpu_unpack.py FILES_AT/run --out runs/NAME/best.safetensors
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

from mtl_model import read_metadata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", type=Path, help="folder with best.NN.zlib")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    parts = sorted(args.parts.glob("best.*.zlib"))
    if not parts:
        raise SystemExit(f"no best.NN.zlib parts in {args.parts}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(zlib.decompress(b"".join(p.read_bytes() for p in parts)))
    meta = read_metadata(args.out)  # a readable, self-describing checkpoint, or an error
    print(f"{args.out}: {meta.model_version}, heads {meta.architecture.tasks}")


if __name__ == "__main__":
    main()
