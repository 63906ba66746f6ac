"""A CT series as one volume: slices sorted along their normal, Hounsfield units, geometry.

Everything downstream (lung mask, network, SEG writer, volumes in mL) relies on the slices
of a series forming one regular, rectilinear stack. :func:`check_geometry` states what is
wrong with a series that does not (so the node can store a reason and send no result),
and :func:`load_series` refuses such a series with :class:`SeriesRejected`.

Both CT Image Storage (one file per slice) and Enhanced / Legacy Converted Enhanced CT
Image Storage (one multi-frame file, geometry in functional groups) are read. Compressed
pixel data (JPEG Lossless, JPEG-LS, JPEG 2000, RLE, deflate) is decoded by pydicom's
pixel handlers (pylibjpeg and its plugins).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.uids import REFERENCED_UIDS, clean_uid, uid_problem

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
SUPPORTED_SOP_CLASSES = {
    CT_IMAGE_STORAGE: "CT Image Storage",
    ENHANCED_CT_IMAGE_STORAGE: "Enhanced CT Image Storage",
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE: "Legacy Converted Enhanced CT Image Storage",
}
MULTIFRAME_SOP_CLASSES = {ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}

#: direction cosines of all slices must agree to this (unitless)
ORIENTATION_TOLERANCE = 1e-3
#: slice gaps may differ from the median gap by this fraction of it (and at least 0.02 mm)
SPACING_RELATIVE_TOLERANCE = 0.05
SPACING_ABSOLUTE_TOLERANCE_MM = 0.02
#: parallel decoding pays off only from this many compressed files on
PARALLEL_MIN_FILES = 16
#: decoded pixel data of one instance above this is refused before decoding
MAX_PIXEL_DATA_BYTES = 1024 * 2**20
#: lowest HU kept; padding and values below it (outside the field of view) become air
HU_FLOOR = -1024.0


class SeriesRejected(Exception):
    """A series the node will not process; ``reason`` is stored and shown to the admin."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FrameGeometry:
    """Where one 2-D frame (a slice) of the series lies in patient space."""

    dataset_index: int
    frame_number: int | None  # 1-based frame of a multi-frame instance, None for single-frame
    position: np.ndarray  # Image Position (Patient), mm
    orientation: np.ndarray  # Image Orientation (Patient), 6 direction cosines
    pixel_spacing: np.ndarray  # (row spacing, column spacing) mm
    rows: int
    columns: int
    rescale_slope: float
    rescale_intercept: float


@dataclass
class CTVolume:
    """A sorted CT stack in HU with its geometry and source headers (pixel data dropped)."""

    hu: np.ndarray  # (Z, Y, X) float32 Hounsfield units, slice 0 = lowest along the normal
    spacing: tuple[float, float, float]  # (slice gap, row spacing, column spacing) mm
    positions: np.ndarray  # (Z, 3) Image Position (Patient) of each sorted slice
    orientation: np.ndarray  # (6,) Image Orientation (Patient)
    datasets: list[Dataset]  # source headers; single-frame: sorted like ``hu``
    frame_numbers: list[int] | None  # multi-frame: 1-based source frame of each slice
    files: list[Path] = field(default_factory=list)
    sop_class_uid: str = CT_IMAGE_STORAGE

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    @property
    def is_multiframe(self) -> bool:
        return self.frame_numbers is not None

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].FrameOfReferenceUID)

    @property
    def origin(self) -> np.ndarray:
        """Position of voxel (0, 0, 0), patient coordinates (mm)."""
        return np.asarray(self.positions[0], dtype=np.float64)

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the x (row), y (column) and slice-normal axes."""
        row = self.orientation[:3]
        col = self.orientation[3:]
        return np.stack([row, col, np.cross(row, col)], axis=1)

    @property
    def voxel_volume_ml(self) -> float:
        dz, dy, dx = self.spacing
        return dz * dy * dx / 1000.0

    def source_order(self, array: np.ndarray) -> np.ndarray:
        """Reorder a (Z, ...) array from sorted order into the source frame order.

        Single-frame sources are kept sorted, so this is the identity for them; a
        multi-frame source may store its frames in any order.
        """
        if self.frame_numbers is None:
            return array
        out = np.empty_like(array)
        out[np.asarray(self.frame_numbers) - 1] = array
        return out


def _floats(value: object, n: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not numeric ({value!r})") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must have {n} finite values, got {value!r}")
    return arr


def _rescale(item: Dataset | None, fallback: Dataset) -> tuple[float, float]:
    src = item if item is not None and "RescaleSlope" in item else fallback
    slope = float(src.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(src.get("RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def _fg(ds: Dataset, frame_index: int, seq_name: str) -> Dataset | None:
    """An item of a functional group sequence: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        seq = per_frame[frame_index].get(seq_name)
        if seq:
            return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(seq_name)
        if seq:
            return seq[0]
    return None


def _frame(
    index: int,
    frame_number: int | None,
    position: Dataset,
    orientation: Dataset,
    measures: Dataset,
    rows: int,
    cols: int,
    rescale: tuple[float, float],
) -> FrameGeometry:
    """One frame from the data sets (or functional group items) holding its plane position,
    orientation and pixel measures."""
    return FrameGeometry(
        index,
        frame_number,
        _floats(position.ImagePositionPatient, 3, "Image Position (Patient)"),
        _floats(orientation.ImageOrientationPatient, 6, "Image Orientation (Patient)"),
        _floats(measures.PixelSpacing, 2, "Pixel Spacing"),
        rows,
        cols,
        *rescale,
    )


def frame_geometries(datasets: Sequence[Dataset]) -> list[FrameGeometry]:
    """Geometry of every frame of the series' instances (headers suffice).

    Raises ``ValueError`` naming the instance when a required attribute is missing.
    """
    frames: list[FrameGeometry] = []
    for i, ds in enumerate(datasets):
        name = str(ds.get("SOPInstanceUID", f"instance #{i + 1}"))
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            if str(ds.get("SOPClassUID", "")) in MULTIFRAME_SOP_CLASSES:
                n = int(ds.get("NumberOfFrames", 1) or 1)
                for f in range(n):
                    pos = _fg(ds, f, "PlanePositionSequence")
                    ori = _fg(ds, f, "PlaneOrientationSequence")
                    meas = _fg(ds, f, "PixelMeasuresSequence")
                    if pos is None or ori is None or meas is None:
                        raise ValueError(
                            f"frame {f + 1} lacks plane position, orientation or pixel measures"
                        )
                    rescale = _rescale(_fg(ds, f, "PixelValueTransformationSequence"), ds)
                    frames.append(_frame(i, f + 1, pos, ori, meas, rows, cols, rescale))
            else:
                for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
                    if kw not in ds:
                        raise ValueError(f"missing {kw}")
                frames.append(_frame(i, None, ds, ds, ds, rows, cols, _rescale(None, ds)))
        except (AttributeError, ValueError, TypeError) as exc:
            raise ValueError(f"instance {name}: {exc}") from exc
    return frames


def _normal(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(n))
    if norm < 0.5:
        raise ValueError("Image Orientation (Patient) row and column cosines are not orthogonal")
    return n / norm


def _series_problems(datasets: Sequence[Dataset]) -> list[str]:
    problems = uid_problems(datasets)
    for keyword, what in (
        ("SeriesInstanceUID", "series"),
        ("StudyInstanceUID", "studies"),
        ("FrameOfReferenceUID", "frames of reference"),
    ):
        values = {clean_uid(ds.get(keyword, "")) for ds in datasets}
        if len(values) > 1 and not any(keyword in p for p in problems):
            problems.append(f"instances belong to {len(values)} different {what}")
    too_big = [p for p in (pixel_size_problem(ds) for ds in datasets) if p is not None]
    if too_big:
        problems.append(f"{too_big[0]} (in {len(too_big)} of {len(datasets)} instance(s))")
    classes = {str(ds.get("SOPClassUID", "")) for ds in datasets}
    unsupported = classes - set(SUPPORTED_SOP_CLASSES)
    if unsupported:
        problems.append(f"unsupported SOP class(es) {sorted(unsupported)} (CT images only)")
    elif len(classes) > 1:
        problems.append("series mixes single-frame and multi-frame CT instances")
    elif classes & MULTIFRAME_SOP_CLASSES and len(datasets) > 1:
        problems.append(
            f"series has {len(datasets)} multi-frame CT instances; one per series is supported"
        )
    return problems


def uid_problems(datasets: Sequence[Dataset]) -> list[str]:
    """Which referenced UIDs are unusable, in how many instances (results cite them)."""
    problems: list[str] = []
    n = len(datasets)
    for keyword, name in REFERENCED_UIDS:
        counts: Counter[str] = Counter()
        example: dict[str, str] = {}
        for ds in datasets:
            value = ds.get(keyword)
            problem = uid_problem(value)
            if problem is not None:
                counts[problem] += 1
                if value is not None and problem not in ("missing", "empty"):
                    example.setdefault(problem, f" (e.g. {str(value)[:70]!r})")
        for problem, count in counts.most_common():
            problems.append(
                f"{name} ({keyword}) is {problem}{example.get(problem, '')} "
                f"in {count} of {n} instance(s); results could not reference them"
            )
    return problems


def pixel_size_problem(ds: Dataset, max_bytes: int = MAX_PIXEL_DATA_BYTES) -> str | None:
    """Decoded pixel data larger than `max_bytes` (checked before decoding: a header with
    absurd Rows/Columns must not make the node try to allocate hundreds of GiB)."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        bits = int(ds.get("BitsAllocated", 16) or 16)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        return f"image pixel module unreadable: {exc}"
    size = rows * cols * samples * frames * max(bits, 8) // 8
    if size > max_bytes:
        return (
            f"decoded pixel data would be {size / 2**20:,.0f} MiB ({rows} x {cols} x {frames} "
            f"frame(s), {bits} bits), over the limit of {max_bytes / 2**20:,.0f} MiB"
        )
    return None


def check_geometry(datasets: Sequence[Dataset]) -> list[str]:
    """What keeps ``datasets`` (headers of one series) from forming one regular volume.

    Checks one orientation, consistent rows/columns and pixel spacing, slices stacked
    along the slice normal (no gantry tilt), no duplicate positions, regular spacing and
    no missing slices. Returns human-readable problems; an empty list means usable.
    """
    if not datasets:
        return ["series has no instances"]
    problems = _series_problems(datasets)
    if problems:
        return problems
    try:
        frames = frame_geometries(datasets)
    except ValueError as exc:
        return [f"geometry unreadable: {exc}"]
    if not frames:
        return ["series has no frames"]

    ref = frames[0]
    orientations = np.stack([f.orientation for f in frames])
    if np.abs(orientations - ref.orientation).max() > ORIENTATION_TOLERANCE:
        distinct = {tuple(np.round(o, 3)) for o in orientations}
        problems.append(f"slices have {len(distinct)} different orientations")
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        problems.append(f"slices have different sizes (rows, columns): {sorted(sizes)}")
    spacings = np.stack([f.pixel_spacing for f in frames])
    if np.abs(spacings - ref.pixel_spacing).max() > 1e-4 * max(1.0, ref.pixel_spacing.max()):
        problems.append("slices have different pixel spacings")
    if np.any(spacings <= 0):
        problems.append("pixel spacing is not positive")
    if problems or len(frames) < 2:
        return problems

    try:
        normal = _normal(ref.orientation)
    except ValueError as exc:
        return [str(exc)]
    positions = np.stack([f.position for f in frames])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    positions = positions[order]
    in_plane = (positions - positions[0]) - np.outer(dist - dist[0], normal)
    if np.linalg.norm(in_plane, axis=1).max() > max(0.5 * ref.pixel_spacing.min(), 0.01):
        problems.append(
            "slices are not stacked along the slice normal (gantry tilt or shifted positions)"
        )
    gaps = np.diff(dist)
    tol_dup = SPACING_ABSOLUTE_TOLERANCE_MM
    duplicates = int(np.sum(gaps < tol_dup))
    if duplicates:
        problems.append(f"{duplicates} duplicate slice position(s)")
        return problems
    step = float(np.median(gaps))
    tol = max(SPACING_ABSOLUTE_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE * step)
    off = np.abs(gaps - step) > tol
    if off.any():
        ratio = gaps / step
        multiples = off & (np.abs(ratio - np.round(ratio)) * step <= tol) & (ratio > 1.5)
        if multiples.any():
            missing = int(np.sum(np.round(ratio[multiples]) - 1))
            where = ", ".join(
                f"{dist[k]:.2f}..{dist[k + 1]:.2f} mm" for k in np.flatnonzero(multiples)[:5]
            )
            problems.append(f"{missing} missing slice(s) (gaps at {where})")
        irregular = off & ~multiples
        if irregular.any():
            problems.append(
                f"irregular slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
                f"(median {step:.3f} mm)"
            )
    return problems


def _read(item: str | Path | Dataset) -> tuple[Dataset, Path | None]:
    if isinstance(item, Dataset):
        return item, None
    path = Path(item)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise SeriesRejected(f"cannot read {path.name}: {exc}") from exc
    if "SOPClassUID" not in ds or "PixelData" not in ds:
        raise SeriesRejected(f"cannot read {path.name}: not a DICOM image")
    return ds, path


def _dedupe(items: list[tuple[Dataset, Path | None]]) -> list[tuple[Dataset, Path | None]]:
    """Drop re-sent copies of the same SOP instance (the same UID received twice)."""
    seen: set[str] = set()
    out = []
    for ds, path in items:
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid and uid in seen:
            logger.debug("ignoring duplicate SOP instance %s (%s)", uid, path)
            continue
        seen.add(uid)
        out.append((ds, path))
    return out


def _pixels(ds: Dataset, where: str) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pixel handlers raise many types
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise SeriesRejected(
            f"cannot decode pixel data of {where} (transfer syntax {ts}): {exc}"
        ) from exc
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesRejected(f"{where}: colour images are not CT")
    return np.asarray(arr)


def _to_hu(stored: np.ndarray, frame: FrameGeometry, out: np.ndarray) -> None:
    """Stored values to HU in ``out`` (float32) without temporaries: a third of the time
    of ``astype`` and arithmetic on copies, the same values."""
    out[...] = stored
    if frame.rescale_slope != 1:
        out *= np.float32(frame.rescale_slope)
    if frame.rescale_intercept != 0:
        out += np.float32(frame.rescale_intercept)


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    if "PixelPaddingValue" not in ds:
        return None
    low = int(ds.PixelPaddingValue)
    high = int(ds.get("PixelPaddingRangeLimit", low))
    low, high = min(low, high), max(low, high)
    return (stored >= low) & (stored <= high)


def _is_compressed(path: str) -> bool:
    """Whether the file's transfer syntax is compressed, from its file meta alone (about
    0.1 ms); an unreadable file is left to the caller, which reports it."""
    try:
        syntax = pydicom.filereader.read_file_meta_info(path).get("TransferSyntaxUID")
    except Exception:  # pydicom's many read errors: _read reports them
        return False
    return syntax is not None and syntax.is_compressed


def _decode_file(path: str) -> np.ndarray | str:
    """Worker-process side of parallel decoding: stored pixel values, or the error text.
    Oversized pixel data is refused before decoding, as the caller's header check does:
    the worker gets the file before that check has run."""
    try:
        ds = pydicom.dcmread(path)
        too_big = pixel_size_problem(ds)
        if too_big is not None:
            return too_big
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # the codecs' own error types; reported by the caller
        return f"{type(exc).__name__}: {exc}"


#: the most decoding processes ``decode_workers = -1`` starts
MAX_AUTO_DECODE_WORKERS = 8


def decode_workers(setting: int, persistent: bool = True) -> int:
    """Decoding processes for a ``[worker] decode_workers`` setting (-1: automatic).

    Automatic is one per usable core, at most :data:`MAX_AUTO_DECODE_WORKERS`. A pool
    made for one series only (``persistent=False``, ``ctmtl-node process``) pays the
    processes' start-up on every call, which only many cores win back: below 8, none.
    """
    if setting >= 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if not persistent and cores < MAX_AUTO_DECODE_WORKERS:
        return 0
    return min(cores, MAX_AUTO_DECODE_WORKERS)


def decode_pool(setting: int) -> Executor | None:
    """A process pool that :func:`load_series` reuses series after series (None: decode in
    the calling thread). Forkserver children import only pydicom and numpy, not torch."""
    n = decode_workers(setting)
    if n < 2:
        return None
    pool = _process_pool(n)
    try:  # start every process now and import this module there: the first series waits not
        for future in [pool.submit(_decoder_ready, 0.05) for _ in range(n)]:
            future.result(timeout=120)
    except Exception as exc:
        logger.warning("decoding processes did not start (%s); decoding in the worker", exc)
        pool.shutdown(cancel_futures=True)
        return None
    logger.info("%d processes decode compressed slices", n)
    return pool


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """Decoding processes that leave Ctrl-C / SIGINT to the node: it reaches the whole
    process group, and the node stops the pool itself, without each child's traceback."""
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=signal.signal,
        initargs=(signal.SIGINT, signal.SIG_IGN),
    )


def _decoder_ready(hold_s: float = 0.0) -> int:
    time.sleep(hold_s)  # held, each call has a process of its own
    return os.getpid()


class _Decoding:
    """Compressed slices decoding in worker processes while the caller reads the headers.

    The compressed files of the series (told by their file meta) go to the workers as soon
    as the series is loaded (pixel codecs hold the GIL, so threads would not help): with
    several cores the decoding is over by the time the headers are read and checked. What
    is not taken is cancelled on :meth:`close`. Without workers, with few compressed files
    (a pool of its own pays for its start), or for in-memory datasets it does nothing and
    the caller decodes.
    """

    def __init__(self, files: Sequence[str | Path | Dataset], workers: int | Executor) -> None:
        self._own: Executor | None = None
        self._futures: dict[str, Future[np.ndarray | str]] = {}
        if isinstance(workers, int) and workers < 2:
            return
        paths = dict.fromkeys(str(f) for f in files if not isinstance(f, Dataset))
        compressed = [path for path in paths if _is_compressed(path)]
        if not compressed or (isinstance(workers, int) and len(compressed) < PARALLEL_MIN_FILES):
            return
        try:
            if isinstance(workers, Executor):
                executor = workers
            else:
                executor = self._own = _process_pool(workers)
            self._futures = {path: executor.submit(_decode_file, path) for path in compressed}
        except Exception as exc:  # a pool that cannot take work: decode in this thread
            logger.warning("parallel decoding failed (%s); decoding serially", exc)
            self.close()

    def take(self, path: Path | None) -> np.ndarray | None:
        """The stored array of ``path`` from a worker, or None: the caller decodes it."""
        if path is None:
            return None
        future = self._futures.pop(str(path), None)
        if future is None:
            return None
        try:
            result = future.result()
        except Exception as exc:  # the pool itself failed: decode the rest serially
            logger.warning("parallel decoding failed (%s); decoding serially", exc)
            self.close()
            return None
        if isinstance(result, str):
            raise SeriesRejected(f"cannot decode pixel data of {path.name}: {result}")
        return result

    def close(self) -> None:
        for future in self._futures.values():
            future.cancel()
        self._futures = {}
        if self._own is not None:
            self._own.shutdown(cancel_futures=True)
            self._own = None


def load_series(
    files: Sequence[str | Path | Dataset], check: bool = True, workers: int | Executor = 0
) -> CTVolume:
    """Read one CT series into a sorted HU volume; raise :class:`SeriesRejected` if unusable.

    ``files`` are paths (or already read datasets) of one series in any order. Re-sent
    copies of an instance are ignored. With ``check`` (the default) a series that fails
    :func:`check_geometry` is rejected with all its problems as the reason. ``workers``
    (a process count, or an executor to reuse) decodes compressed slices in parallel.
    """
    if not files:
        raise SeriesRejected("series has no instances")
    decoding = _Decoding(files, workers)
    try:
        return _load(files, check, decoding)
    finally:
        decoding.close()


def _load(files: Sequence[str | Path | Dataset], check: bool, decoding: _Decoding) -> CTVolume:
    items = _dedupe([_read(f) for f in files])
    datasets = [ds for ds, _ in items]
    problems = _series_problems(datasets)
    if problems:
        raise SeriesRejected("; ".join(problems))
    if check:
        problems = check_geometry(datasets)
        if problems:
            raise SeriesRejected("; ".join(problems))
    try:
        frames = frame_geometries(datasets)
    except ValueError as exc:
        raise SeriesRejected(f"geometry unreadable: {exc}") from exc
    if not check and len({(f.rows, f.columns) for f in frames}) > 1:
        raise SeriesRejected("slices have different sizes")

    ref = frames[0]
    normal = _normal(ref.orientation)
    dist = np.array([f.position @ normal for f in frames])
    order = np.argsort(dist, kind="stable")
    multiframe = ref.frame_number is not None

    hu = np.empty((len(frames), ref.rows, ref.columns), dtype=np.float32)
    if multiframe:
        ds = datasets[0]
        stored = _pixels(ds, f"instance {ds.get('SOPInstanceUID', '')}")
        if stored.ndim == 2:
            stored = stored[None]
        pad = _padding_mask(ds, stored)
        for k, idx in enumerate(order):
            f = frames[idx]
            fi = int(f.frame_number or 1) - 1
            _to_hu(stored[fi], f, hu[k])
            if pad is not None:
                hu[k][pad[fi]] = HU_FLOOR
        if items[0][1] is not None:  # read here: drop the pixels, keep the header
            del ds.PixelData
        sorted_datasets = [ds]
        frame_numbers: list[int] | None = [int(frames[i].frame_number or 1) for i in order]
    else:
        sorted_datasets = []
        for k, idx in enumerate(order):
            f = frames[idx]
            ds, path = items[f.dataset_index]
            where = f"{path.name if path else 'instance'} ({ds.get('SOPInstanceUID', '')})"
            decoded = decoding.take(path)
            stored = _pixels(ds, where) if decoded is None else decoded
            if stored.shape != (ref.rows, ref.columns):
                raise SeriesRejected(
                    f"{where}: pixel array {stored.shape} does not match Rows/Columns"
                )
            _to_hu(stored, f, hu[k])
            pad = _padding_mask(ds, stored)
            if pad is not None:
                hu[k][pad] = HU_FLOOR
            if path is not None and "PixelData" in ds:
                del ds.PixelData
            sorted_datasets.append(ds)
        frame_numbers = None
    np.maximum(hu, HU_FLOOR, out=hu)

    dist_sorted = dist[order]
    if len(frames) > 1:
        dz = float(np.median(np.diff(dist_sorted)))
    else:
        first = datasets[0]
        dz = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)
    paths = [items[frames[i].dataset_index][1] for i in order]
    volume = CTVolume(
        hu=hu,
        spacing=(dz, float(ref.pixel_spacing[0]), float(ref.pixel_spacing[1])),
        positions=np.stack([frames[i].position for i in order]),
        orientation=ref.orientation.copy(),
        datasets=sorted_datasets,
        frame_numbers=frame_numbers,
        files=[p for p in dict.fromkeys(paths) if p is not None],
        sop_class_uid=str(datasets[0].SOPClassUID),
    )
    logger.debug(
        "loaded series %s: %d slices %dx%d, spacing %.3f/%.3f/%.3f mm, HU %.0f..%.0f",
        volume.series_instance_uid,
        *volume.shape,
        *volume.spacing,
        float(hu.min()),
        float(hu.max()),
    )
    return volume
