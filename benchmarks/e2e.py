"""End-to-end node benchmark: a 300-slice 512x512 CT series by C-STORE, results to a PACS.

Usage:
  python benchmarks/e2e.py [--width 64] [--device auto|cpu|cuda] [--checkpoint P]
                           [--slices 300] [--idle 2] [--precision auto|fp32|bf16]
                           [--batch N] [--decode-workers -1] [--data DIR] [--workdir DIR]
                           [--json OUT]

What it does, with real parts only:
1. synthesizes a series of `--slices` slices from the real COVID chest CT in the data folder
   (nearest real slice for each new position along z, compressed pixel data copied as is,
   new UIDs, regular spacing over the same extent);
2. starts DCMTK `storescp` as the receiving PACS (a pynetdicom storage SCP in a thread of
   this process when DCMTK is absent) and the node (`ctmtl-node serve`, a separate process,
   SQLite + spool in a temp folder) with a model of `--width` (random weights unless
   `--checkpoint`: timing does not depend on the weights);
3. sends the series with DCMTK `storescu` (pynetdicom when DCMTK is absent) and prints
   the ingest rate (instances/s, MB/s);
4. waits for the SEG + SR to be acknowledged by the PACS and prints the time from the
   series being ready (completion made its job) to that acknowledgement, split into
   queue wait, load, lung mask, inference, SEG, SR and send.

The model is loaded when the node starts, before the series arrives, as in production.
The JSON names the PACS and the sender used and the machine (CPU, threads, GPU).
`CTMTL_BENCH_NO_DCMTK=1` ignores an installed DCMTK (pynetdicom for both ends).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicom_node.db import Database, Delivery, DeliveryState, Job, Result  # noqa: E402
from dicom_node.export import Peer, echo  # noqa: E402

if TYPE_CHECKING:
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

SERIES = "dicom/ricord-1a-covid-chest-ct"


def data_root(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("CTMTL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk(name: str) -> str | None:
    if os.environ.get("CTMTL_BENCH_NO_DCMTK", "") not in ("", "0"):
        return None
    for folder in ("/usr/bin", "/usr/local/bin"):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


# what the node sends: the CT it was given, the lesion SEG and the TID 1500 SR
PACS_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR Storage
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR Storage
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR Storage
)


def start_pynetdicom_pacs(port: int, folder: Path) -> ThreadedAssociationServer:
    """A storage SCP "PACS" in threads of this process, DCMTK storescp's stand-in.

    Accepts the CT, SEG and SR storage classes (and C-ECHO) in every transfer syntax
    pynetdicom knows, preferring explicit then implicit VR little endian as storescp does
    (the acceptor's order decides), writes each dataset as received to `folder` and
    answers 0x0000.
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    def on_store(event: Event) -> int:
        uid = event.file_meta.MediaStorageSOPInstanceUID  # the request's, as pynetdicom sets
        (folder / f"{uid}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    preferred = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    syntaxes = preferred + [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in preferred]
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    for sop_class in PACS_SOP_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None  # block=False returns the running server
    return server


def machine() -> dict[str, Any]:
    """CPU model and threads, torch and the GPU (as `benchmarks/predictor.py` names them)."""
    from predictor import machine as predictor_machine  # benchmarks/, this script's folder

    return predictor_machine()


def synthesize_series(
    sources: list[Path], out_dir: Path, n_slices: int, spacing: float | None = None
) -> list[Path]:
    """`n_slices` slices over the extent of `sources`, each from its nearest real slice.

    With `spacing` (mm) the slices start at the lowest source position and go up by that
    step instead: a single source slice then makes a whole series.
    """
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources]
    order = np.argsort([float(h.ImagePositionPatient[2]) for h in headers])
    sources = [sources[i] for i in order]
    z = np.array([float(headers[i].ImagePositionPatient[2]) for i in order])
    if spacing is None:
        new_z = np.linspace(z[0], z[-1], n_slices)
    else:
        new_z = z[0] + spacing * np.arange(n_slices)
    nearest = np.abs(new_z[:, None] - z[None, :]).argmin(axis=1)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache: dict[int, pydicom.Dataset] = {}
    paths = []
    for k, (zk, src) in enumerate(zip(new_z, nearest, strict=True)):
        if int(src) not in cache:
            cache.clear()
            cache[int(src)] = pydicom.dcmread(sources[int(src)])
        ds = cache[int(src)]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesDescription = f"CHEST benchmark {n_slices} slices"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(float(zk), 4)]
        ds.SliceLocation = round(float(zk), 4)
        ds.SpacingBetweenSlices = round(float(new_z[1] - new_z[0]), 4)
        path = out_dir / f"{k:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def make_checkpoint(width: int, path: Path, like: Path | None = None) -> Path:
    """Random weights: the paper's network at ``width``, or the network and preprocessing
    that ``like`` describes (a checkpoint, or its metadata as JSON where the weights cannot
    travel), so that a lent GPU times the shipped architecture (its lung-box classifier)."""
    import torch

    from mtl_model import CheckpointMetadata, read_metadata, save_checkpoint
    from mtl_model.checkpoint import ArchitectureSpec

    torch.manual_seed(0)
    tasks = ["segmentation", "classification"]
    if like is not None:
        src = (
            CheckpointMetadata.model_validate_json(like.read_text())
            if like.suffix == ".json"
            else read_metadata(like)
        )
        arch = src.architecture.model_copy(update={"tasks": tasks})
        meta = CheckpointMetadata(
            architecture=arch,
            preprocessing=src.preprocessing,
            model_version=f"benchmark-random-like-{src.model_version}",
            notes="random weights, benchmark only",
        )
    else:
        arch = ArchitectureSpec(name="mtl", base_width=width, input_size=256, tasks=tasks)
        meta = CheckpointMetadata(
            architecture=arch,
            model_version=f"benchmark-random-w{width}",
            notes="random weights, benchmark only",
        )
    return save_checkpoint(arch.build(), meta, path)


def peak_rss_mib(pid: int) -> dict[str, Any] | None:
    """Peak resident memory (VmHWM) of the node process, and the sum of its child processes'
    peaks (the decoding pool; an upper bound of their peak together). Linux only."""

    def hwm(p: int | str) -> float:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
        return 0.0

    try:
        children = [
            c
            for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()
        ]
        own = hwm(pid)
        kids = sum(hwm(c) for c in children)
    except OSError:
        return None
    return {"node": round(own, 1), "children": len(children), "children_mib": round(kids, 1)}


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the node's orderly stop), then SIGKILL after 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_node(work: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    """`ctmtl-node serve --config CONFIG` as a separate process, its log in work/node.log;
    returns once it answers C-ECHO on `port` (or raises with the log's last lines if it
    exits first)."""
    log = work / "node.log"
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    peer = Peer("CTMTL", "127.0.0.1", port, "BENCHSCU", 5)

    def answers() -> bool:
        if node.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the node exited ({node.returncode}): " + " | ".join(tail))
        return bool(echo(peer)[0])

    try:
        wait(answers, 120, "the node to answer C-ECHO", step=0.5)
    except BaseException:
        stop(node)
        raise
    return node


def wait(predicate: Any, timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def send(files: list[Path], port: int) -> tuple[float, str]:
    """C-STORE all files to the node; returns (seconds, sender)."""
    storescu = dcmtk("storescu")
    t0 = time.perf_counter()
    if storescu:
        ts = str(pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
        propose = ["-xs"] if ts == "1.2.840.10008.1.2.4.70" else []
        done = subprocess.run(
            [
                storescu,
                "-aet",
                "BENCHSCU",
                "-aec",
                "CTMTL",
                *propose,
                "127.0.0.1",
                str(port),
                *[str(f) for f in files],
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"storescu failed: {done.stderr[-2000:]}")
        return time.perf_counter() - t0, "DCMTK storescu"
    from pynetdicom import AE

    ae = AE(ae_title="BENCHSCU")
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTMTL")
    try:
        for f in files:
            status = assoc.send_c_store(f)
            if status.Status != 0:
                raise RuntimeError(f"C-STORE of {f} failed: 0x{status.Status:04X}")
    except BaseException:  # interrupted too: abort, or the node waits for the association
        assoc.abort()
        raise
    assoc.release()
    return time.perf_counter() - t0, "pynetdicom"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64, help="network base width (paper: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    parser.add_argument("--checkpoint", help="use this checkpoint instead of random weights")
    parser.add_argument(
        "--like",
        type=Path,
        help="random weights shaped like this checkpoint (or its metadata JSON), instead "
        "of the paper's network at --width",
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument(
        "--batch", type=int, help="predictor batch size (default: the node's: 2 CPU, 16 GPU)"
    )
    parser.add_argument(
        "--decode-workers",
        type=int,
        default=-1,
        help="[worker] decode_workers: -1 one process per core (at most 8, the default), "
        "0 decode in the worker thread",
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--idle", type=float, default=2.0, help="completion idle seconds")
    parser.add_argument("--data", help="data folder (default $CTMTL_DATA or ../shared/data)")
    parser.add_argument("--workdir", help="keep everything here (default: a temp folder)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    sources = sorted((data_root(args.data) / SERIES).glob("*.dcm"))
    if not sources:
        parser.error(f"no source series found under {data_root(args.data) / SERIES}")
    storescp = dcmtk("storescp")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ctmtl-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    pacs_server: ThreadedAssociationServer | None = None
    try:
        t = time.perf_counter()
        files = synthesize_series(sources, work / "series", args.slices)
        total_bytes = sum(f.stat().st_size for f in files)
        print(
            f"series: {len(files)} slices 512x512 from {SERIES}, "
            f"{total_bytes / 2**20:.1f} MiB ({time.perf_counter() - t:.1f} s to make)"
        )
        checkpoint = (
            Path(args.checkpoint).resolve()  # the node reads paths from its config's folder
            if args.checkpoint
            else make_checkpoint(args.width, work / f"random-w{args.width}.safetensors", args.like)
        )

        pacs_port, node_port = free_port(), free_port()
        (work / "pacs").mkdir(exist_ok=True)
        if storescp is not None:
            pacs = "DCMTK storescp"
            # DCMTK 3.6.7 storescp cannot bind one address: it listens on a random free port
            procs.append(
                subprocess.Popen(
                    [
                        storescp,
                        "--aetitle",
                        "PACS",
                        "--output-directory",
                        str(work / "pacs"),
                        str(pacs_port),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=(work / "storescp.log").open("wb"),
                )
            )
        else:
            pacs = "pynetdicom"
            pacs_server = start_pynetdicom_pacs(pacs_port, work / "pacs")
        print(f"PACS: {pacs} on port {pacs_port}")
        config = work / "node.toml"
        config.write_text(f"""
[node]
ae_title = "CTMTL"
port = {node_port}
[[allowed_callers]]
ae_title = "BENCHSCU"
host = "127.0.0.1"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
[routing]
default = ["pacs"]
[completion]
idle_seconds = {args.idle}
poll_interval_s = 0.2
[model]
checkpoint = "{checkpoint}"
device = "{args.device}"
precision = "{args.precision}"
{f"batch_size = {args.batch}" if args.batch else ""}
[spool]
path = "spool"
min_free_mb = 0
[worker]
poll_interval_s = 0.2
decode_workers = {args.decode_workers}
[export]
poll_interval_s = 0.2
""")
        node = start_node(work, config, node_port)
        procs.append(node)
        log = work / "node.log"
        db = Database(f"sqlite:///{work / 'spool' / 'ctmtl-node.db'}")
        wait(lambda: "model loaded" in log.read_text(), 300, "the model to load", step=0.5)

        seconds, sender = send(files, node_port)
        print(
            f"ingest ({sender}): {len(files) / seconds:.1f} instances/s, "
            f"{total_bytes / 2**20 / seconds:.1f} MiB/s ({seconds:.2f} s for "
            f"{len(files)} instances)"
        )

        def delivered() -> Any:
            with db.session() as s:
                d = s.query(Delivery).filter(Delivery.state == DeliveryState.DONE).first()
                if d is None:
                    failed = s.query(Job).filter(Job.state.in_(("failed", "rejected"))).first()
                    if failed is not None:
                        raise RuntimeError(f"job {failed.id} {failed.state}: {failed.error}")
                    return None
                r = s.get(Result, d.result_id)
                j = s.get(Job, r.job_id) if r else None
                return d, r, j

        d, r, j = wait(delivered, 3600, "results acknowledged by the PACS", step=0.2)
        db.dispose()
        rss = peak_rss_mib(node.pid)
        timings = dict(j.timings or {})
        ready_to_ack = (d.delivered_at - j.created_at).total_seconds()
        stages = {
            "queue_wait": (j.started_at - j.created_at).total_seconds(),
            "load": timings.get("load", 0.0),
            "lung_mask": timings.get("lung_mask", 0.0),
            "inference": timings.get("inference", 0.0),
            "seg": timings.get("seg", 0.0),
            "sr": timings.get("sr", 0.0),
            "send": (d.delivered_at - r.created_at).total_seconds(),
        }
        stages["other"] = ready_to_ack - sum(stages.values())
        received = len([p for p in (work / "pacs").iterdir() if p.is_file()])
        device_line = next(
            (
                ln.split("predictor ready: ", 1)[1]
                for ln in log.read_text().splitlines()
                if "predictor ready:" in ln
            ),
            "?",
        )
        print(f"model: width {args.width}, {device_line}")
        print(
            f"series ready (idle {args.idle:g} s after the last instance) -> results "
            f"acknowledged by the PACS ({received} objects): {ready_to_ack:.1f} s"
        )
        for name, value in stages.items():
            print(f"  {name:<11} {value:8.2f} s")
        if rss is not None:
            print(
                f"peak RSS: node {rss['node']:.0f} MiB, its {rss['children']} child process(es) "
                f"(decoding pool) {rss['children_mib']:.0f} MiB together"
            )
        figures = {
            "slices": len(files),
            "megabytes": round(total_bytes / 2**20, 2),
            "ingest_seconds": round(seconds, 3),
            "ingest_instances_per_s": round(len(files) / seconds, 2),
            "ingest_mib_per_s": round(total_bytes / 2**20 / seconds, 2),
            "ready_to_ack_seconds": round(ready_to_ack, 3),
            "stages": {k: round(v, 3) for k, v in stages.items()},
            "peak_rss_mib": rss,
            "width": args.width,
            "device": device_line,
            "sender": sender,
            "pacs": pacs,
            "batch": args.batch,
            "decode_workers": args.decode_workers,
            "precision": args.precision,
            "machine": machine(),
        }
        print(json.dumps(figures))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return 0
    finally:
        if pacs_server is not None:
            pacs_server.shutdown()
        for proc in reversed(procs):
            stop(proc)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
