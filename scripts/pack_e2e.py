"""Build `.gpu2/`, what `scripts/gpu_e2e.sh` needs on a GPU machine without network.

    python scripts/pack_e2e.py [--out .gpu2] [--every 5] [--cache /tmp/ctmtl-e2e-wheels]

The device image has torch, numpy, pillow, matplotlib, rich, tqdm, prometheus-client,
safetensors, packaging and markupsafe, but none of the node's DICOM, database or config
packages. This writes, under a 64 MiB transfer limit:

- `site.tar.xz`: the wheels of every other runtime dependency of `ctmtl` (the versions
  installed here, CPython 3.12 manylinux builds), unpacked as `pip install --target` would
  and packed with xz; the SimpleITK wheel alone is 53 MB zipped, 28 MB as xz. Unpack with
  `tarfile.open(...).extractall("/tmp/site")` and put /tmp/site on PYTHONPATH;
- `data/dicom/ricord-1a-covid-chest-ct/`: every `--every`-th slice (by position, first and
  last kept) of the shared RICORD COVID-19 series, the source `benchmarks/e2e.py
  --data .gpu2/data` synthesizes its series from (nearest real slice for each position);
- `like.json`: the shipped release's metadata (no weights: they are over the limit), so
  that `benchmarks/e2e.py --like` times random weights of the shipped architecture;
- `MANIFEST.txt`: the packages, the slices and the sizes.

It checks that each `dependencies` entry of pyproject.toml and each requirement of a packed
wheel is either packed or on the device image (`ON_DEVICE`), and stops if the folder
would pass `--limit-mib`. Needs pip (and its index) here; the wheels are cached in `--cache`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
SERIES = "dicom/ricord-1a-covid-chest-ct"

# runtime packages of `ctmtl` that the device image lacks, and what they need in turn
PACKED = (
    "pydicom",
    "pynetdicom",
    "highdicom",
    "pyjpegls",
    "SimpleITK",
    "SQLAlchemy",
    "alembic",
    "Mako",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",  # on the image too, but pydantic 2.14 needs >= 4.16
)
# on the device image (docs: the H200 kind's package list); not packed
ON_DEVICE = (
    "torch",
    "numpy",
    "safetensors",
    "tqdm",
    "rich",
    "prometheus-client",
    "pillow",
    "matplotlib",
    "packaging",
    "markupsafe",
)
PLATFORMS = (
    "manylinux_2_34_x86_64",  # pylibjpeg-libjpeg 2.5 (the image's glibc is 2.39)
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)


def canonical(name: str) -> str:
    return str(canonicalize_name(name))


def download(cache: Path, python_version: str) -> list[Path]:
    """The PACKED wheels, at the versions installed here, for CPython `python_version`."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in PACKED]
    cache.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(cache),
        *pins,
    ]
    subprocess.run(command, check=True)
    wheels = []
    for pin in pins:
        name, version = pin.split("==")
        stem = re.sub(r"[-_.]+", "_", name).lower()
        found = [
            w
            for w in cache.glob("*.whl")
            if w.name.lower().startswith(f"{stem}-{version}-".lower())
        ]
        if len(found) != 1:
            raise SystemExit(f"expected one wheel of {pin} in {cache}, found {found}")
        wheels.append(found[0])
    return wheels


def wheel_requirements(wheel: Path, python_version: str) -> set[str]:
    """Names a wheel requires on CPython `python_version` (no extras)."""
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta_name).decode()
    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    names = set()
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            marker = requirement.marker
            if marker is None or marker.evaluate({**environment, "extra": ""}):
                names.add(canonical(requirement.name))
    return names


def check_complete(wheels: list[Path], python_version: str) -> None:
    available = {canonical(n) for n in (*PACKED, *ON_DEVICE)}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    dependencies = pyproject["project"]["dependencies"]
    needed = {canonical(Requirement(r).name): "pyproject.toml" for r in dependencies}
    for wheel in wheels:
        needed.update({n: wheel.name for n in wheel_requirements(wheel, python_version)})
    missing = {name: by for name, by in needed.items() if name not in available}
    if missing:
        raise SystemExit(f"neither packed nor on the device: {missing}")


def pack_site(wheels: list[Path], out: Path) -> None:
    """Unpack the wheels (as `pip install --target` lays them out), tar, xz -9."""
    with tempfile.TemporaryDirectory(prefix="ctmtl-site-") as tmp:
        site = Path(tmp) / "site"
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
        tar_path = Path(tmp) / "site.tar"
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(site.rglob("*")):
                info = tar.gettarinfo(str(path), str(path.relative_to(site)))
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if path.is_file():
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        xz = shutil.which("xz")
        if xz:  # multi-threaded; the same .xz format
            with out.open("wb") as f:
                subprocess.run([xz, "-9", "-T0", "-c", str(tar_path)], stdout=f, check=True)
        else:
            with tar_path.open("rb") as src, lzma.open(out, "wb", preset=9) as dst:
                shutil.copyfileobj(src, dst, 2**24)


def pack_series(source: Path, out: Path, every: int) -> list[str]:
    """Every `every`-th slice of `source` along z, the first and the last included."""
    files = sorted(source.glob("*.dcm"))
    if not files:
        raise SystemExit(f"no .dcm files in {source}")
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    order = np.argsort(z)
    keep = sorted({*range(0, len(files), every), len(files) - 1})
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k in keep:
        f = files[int(order[k])]
        shutil.copyfile(f, out / f.name)
        names.append(f.name)
    return names


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / ".gpu2")
    ap.add_argument("--data", type=Path, help="data folder (default $CTMTL_DATA or ../shared)")
    ap.add_argument("--every", type=int, default=5, help="keep every N-th source slice")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ctmtl-e2e-wheels")
    ap.add_argument("--python-version", default="3.12", help="the device's CPython")
    ap.add_argument("--limit-mib", type=float, default=60.0)
    args = ap.parse_args()

    from mtl_model.stacks import default_data_root

    data = args.data or default_data_root()
    wheels = download(args.cache, args.python_version)
    check_complete(wheels, args.python_version)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    pack_site(wheels, args.out / "site.tar.xz")
    slices = pack_series(data / SERIES, args.out / "data" / SERIES, args.every)
    from mtl_model import default_checkpoint_path, read_metadata

    release = read_metadata(default_checkpoint_path())
    (args.out / "like.json").write_text(release.model_dump_json(indent=1))

    manifest = io.StringIO()
    manifest.write(f"# scripts/pack_e2e.py --every {args.every}, CPython {args.python_version}\n")
    for wheel in wheels:
        manifest.write(f"wheel {wheel.name} {wheel.stat().st_size}\n")
    manifest.write(f"site.tar.xz {(args.out / 'site.tar.xz').stat().st_size}\n")
    manifest.write(f"series {SERIES}: {len(slices)} slices {' '.join(slices)}\n")
    manifest.write(f"like.json: release {release.model_version}\n")
    (args.out / "MANIFEST.txt").write_text(manifest.getvalue())
    total = size(args.out)
    print(manifest.getvalue(), end="")
    print(f"{args.out}: {total} bytes = {total / 2**20:.2f} MiB")
    if total > args.limit_mib * 2**20:
        raise SystemExit(f"{args.out} is over {args.limit_mib} MiB")


if __name__ == "__main__":
    main()
