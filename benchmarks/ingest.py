"""Storage SCP ingest benchmark: N concurrent associations of 512x512 CT into the node.

Usage:
  python benchmarks/ingest.py [--series 10] [--slices 300] [--data DIR] [--workdir DIR]
                              [--json OUT]

What it measures, with real parts only:
1. synthesizes `--series` + 1 series of `--slices` uncompressed (explicit VR little endian)
   512x512 CT slices, about 150 MB a series at 300 slices, all from one real slice of
   `dicom/lung-pet-ct-dx-a0002` in the data folder (pixel data as is, new study, series
   and instance UIDs, positions 1 mm apart along z);
2. starts the node (`python -m dicom_node serve`, a separate process, SQLite + spool in a
   temp folder) with the worker and the exporter disabled and series completion far
   away, so that the storage SCP is all that runs;
3. "concurrent": sends `--series` series at once, one DCMTK `storescu` process (one
   association) per series, all started together (pynetdicom threads when DCMTK is
   absent), and times from the first start to the last one's end;
4. "single": sends the remaining series alone, one association;
5. after each phase counts the instances of its series in the node's database and
   reports those lost (sent but not stored; any is a failure, exit status 1).

Figures per phase: associations, instances, megabytes (MiB of the files sent), seconds,
instances/s, MiB/s, lost. The JSON also names the sender and the machine (CPU, threads).
`CTMTL_BENCH_NO_DCMTK=1` ignores an installed DCMTK (pynetdicom threads send).

Issue 14 target: at least 100 MB/s summed over 10 concurrent associations, no instance
lost. Measured (2-core Intel Xeon, twelfth session, quiet): 106-111 MiB/s over 10
associations, 70-75 MiB/s over one (README, "Benchmarks").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom

# e2e.py: this script's folder (on sys.path); importing it puts the repository there too
from e2e import data_root, free_port, machine, send, start_node, stop, synthesize_series
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select

from dicom_node.db import Database, Instance, Series

SOURCE = "dicom/lung-pet-ct-dx-a0002"
SPACING_MM = 1.0


def source_slice(root: Path) -> Path:
    """The middle slice of the source series (uncompressed 512x512 CT)."""
    files = sorted((root / SOURCE).glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"no source series found under {root / SOURCE}")
    path = files[len(files) // 2]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        raise ValueError(f"{path}: {ds.file_meta.TransferSyntaxUID.name}, not uncompressed")
    return path


def series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def stored(db: Database, uids: list[str]) -> int:
    """Instances the node recorded for these series."""
    with db.session() as s:
        count = s.scalar(
            select(func.count(Instance.id))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_instance_uid.in_(uids))
        )
    return int(count or 0)


def phase(
    name: str, batches: list[list[Path]], port: int, db: Database
) -> tuple[dict[str, Any], str]:
    """Send each batch on its own association, all at once; the figures and the sender."""
    n_files = sum(len(b) for b in batches)
    n_bytes = sum(f.stat().st_size for b in batches for f in b)
    senders: set[str] = set()
    errors: list[str] = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(batches)) as pool:
        futures = [pool.submit(send, batch, port) for batch in batches]
        for future in futures:
            try:
                senders.add(future.result()[1])
            except Exception as exc:  # counted as lost below; the others still finish
                errors.append(str(exc).strip().splitlines()[-1] if str(exc) else repr(exc))
    seconds = time.perf_counter() - t0
    lost = n_files - stored(db, [series_uid(b) for b in batches])
    figures = {
        "associations": len(batches),
        "instances": n_files,
        "megabytes": round(n_bytes / 2**20, 2),
        "seconds": round(seconds, 3),
        "instances_per_s": round(n_files / seconds, 2),
        "mib_per_s": round(n_bytes / 2**20 / seconds, 2),
        "lost": lost,
    }
    print(
        f"{name}: {len(batches)} association(s), {n_files} instances, "
        f"{n_bytes / 2**20:.1f} MiB in {seconds:.2f} s: {n_files / seconds:.1f} instances/s, "
        f"{n_bytes / 2**20 / seconds:.1f} MiB/s, {lost} lost"
    )
    for error in errors:
        print(f"  sender error: {error}")
    return figures, " + ".join(sorted(senders)) or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=10, help="concurrent associations")
    parser.add_argument("--slices", type=int, default=300, help="slices per series")
    parser.add_argument("--data", help="data folder (default $CTMTL_DATA or ../shared/data)")
    parser.add_argument("--workdir", help="keep everything here (default: a temp folder)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.series < 1 or args.slices < 2:
        parser.error("--series must be at least 1 and --slices at least 2")

    try:
        source = source_slice(data_root(args.data))
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ctmtl-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    node: subprocess.Popen[bytes] | None = None
    try:
        t = time.perf_counter()
        batches = [
            synthesize_series([source], work / "series" / f"{k:02d}", args.slices, SPACING_MM)
            for k in range(args.series + 1)
        ]
        size = sum(f.stat().st_size for f in batches[0]) / 2**20
        print(
            f"series: {len(batches)} x {args.slices} slices 512x512 from {source.parent.name}/"
            f"{source.name}, {size:.1f} MiB each ({time.perf_counter() - t:.1f} s to make)"
        )

        port = free_port()
        config = work / "node.toml"
        config.write_text(f"""
[node]
ae_title = "CTMTL"
port = {port}
max_associations = {max(16, args.series + 2)}
[[allowed_callers]]
ae_title = "BENCHSCU"
host = "127.0.0.1"
[completion]
idle_seconds = 86400
interrupted_idle_seconds = 86400
poll_interval_s = 60
[spool]
path = "spool"
min_free_mb = 0
[worker]
enabled = false
[export]
enabled = false
""")
        node = start_node(work, config, port)
        print(f"node: port {port}, worker and exporter disabled")
        db = Database(f"sqlite:///{work / 'spool' / 'ctmtl-node.db'}")
        try:
            concurrent, sender = phase("concurrent", batches[:-1], port, db)
            single, _ = phase("single", batches[-1:], port, db)
        finally:
            db.dispose()
        figures = {
            "concurrent": concurrent,
            "single": single,
            "sender": sender,
            "machine": machine(),
        }
        print(json.dumps(figures))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return 1 if concurrent["lost"] or single["lost"] else 0
    finally:
        if node is not None:
            stop(node)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
