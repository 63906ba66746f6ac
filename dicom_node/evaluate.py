"""``ctmtl-node evaluate``: score the node's series verdict on labelled series folders.

The product owner scores releases on real chest CT series with this command, so it runs
exactly what the worker runs between the received files and the DICOM writers
(:func:`dicom_node.pipeline.analyse_volume`: lung mask, ``mtl_model.Predictor``, the
series aggregation, the node's threshold), on two kinds of folder:

* DICOM: the CT files of one series (read and checked by ``load_series``, as the worker
  does; a series the node would reject is listed as rejected with the node's reason);
* an ordered stack of 8-bit PNG slices in the lung window (the layout of ``luna16-3/``),
  sorted by file name in natural order. Grey value ``v`` becomes the HU the window
  implies, ``v / 255 * width + centre - width / 2`` (centre -600, width 1500 unless the
  folder's ``stack.json`` says otherwise), so the HU lung mask works on it. A PNG has no
  geometry: the voxel spacing is ``stack.json``'s ``spacing_mm`` ([z, y, x]) or
  ``mtl_model.stacks.STACK_SPACING_MM``; it changes the mL figures, hardly the lung mask,
  and neither the probabilities nor the percentages.

The labels CSV has a header with ``path`` and ``covid`` (0 or 1); paths are relative to
the CSV, or start with ``$CTMTL_DATA/`` for the data folder (env ``CTMTL_DATA``, else
``../shared/data`` beside the repository), as in ``config/eval/shared_series.csv``. A
malformed CSV is refused as a whole (every bad line named), because scores on a silently
shortened list would mislead; a series that cannot be read or is rejected
is listed with its reason and counted (``n_rejected``, ``n_failed``, and in
``accuracy_counting_unscored`` as a wrong verdict), never dropped.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.pipeline import analyse_volume, series_files, slice_positions
from dicom_node.results import ResultOptions
from dicom_node.volume import SeriesRejected, load_series
from mtl_model import LUNG_WINDOW, HUWindow
from mtl_model.metrics import auc_ci, classification_metrics, write_roc_png
from mtl_model.preprocessing import unit_to_hu
from mtl_model.stacks import STACK_SPACING_MM, STACK_SUFFIXES, default_data_root, stack_files

logger = logging.getLogger(__name__)

STACK_SIDECAR = "stack.json"
DATA_PREFIXES = ("$CTMTL_DATA/", "${CTMTL_DATA}/")


def _resolve(csv_dir: Path, rel: str) -> Path:
    for prefix in DATA_PREFIXES:
        if rel.startswith(prefix):
            return (default_data_root() / rel[len(prefix) :]).resolve()
    return (csv_dir / rel).resolve()


class LabelsError(ValueError):
    """A labels CSV that cannot be used; ``problems`` has one message per bad line."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


@dataclass(frozen=True)
class LabelledSeries:
    path: Path  # resolved against the CSV's folder
    label: str  # as written in the CSV
    covid: int


@dataclass
class SeriesInput:
    """One series as the analysis needs it: HU volume, spacing and per-slice identity."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    slice_ids: list[str]
    z_mm: list[float]
    kind: str  # "dicom" or "png_stack"
    series_instance_uid: str | None = None


@dataclass
class SeriesScore:
    """One CSV row's outcome: scored with its figures, or rejected / failed with a reason."""

    path: str
    covid: int
    status: str  # "scored", "rejected" (the node's own refusal) or "failed" (unreadable)
    reason: str | None = None
    kind: str | None = None
    series_instance_uid: str | None = None
    covid_probability: float | None = None
    predicted_covid: bool | None = None
    lesion_volume_ml: float | None = None
    lung_volume_ml: float | None = None
    lung_involvement_percent: float | None = None
    n_slices: int | None = None
    seconds: float | None = None
    slices: list[dict[str, Any]] = field(default_factory=list)


def read_labels(csv_path: str | Path) -> list[LabelledSeries]:
    """The rows of a ``path,covid`` CSV; :class:`LabelsError` lists every bad line."""
    path = Path(csv_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelsError(path, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(path, [f"cannot read it ({exc})"]) from None
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise LabelsError(path, ["empty; expected a header 'path,covid' and one row per series"])
    header = [c.strip().lower() for c in rows[0]]
    missing = [c for c in ("path", "covid") if c not in header]
    if missing:
        raise LabelsError(
            path, [f"header {rows[0]} lacks column(s) {missing}; expected 'path,covid'"]
        )
    ip, ic = header.index("path"), header.index("covid")
    problems: list[str] = []
    out: list[LabelledSeries] = []
    seen: dict[Path, int] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            problems.append(f"line {line_no}: {len(row)} fields, the header has {len(header)}")
            continue
        rel, label = row[ip].strip(), row[ic].strip()
        if not rel:
            problems.append(f"line {line_no}: empty path")
            continue
        if label not in ("0", "1"):
            problems.append(f"line {line_no}: covid must be 0 or 1, got {label!r}")
            continue
        resolved = _resolve(path.parent, rel)
        if resolved in seen:
            problems.append(f"line {line_no}: {rel} is listed already on line {seen[resolved]}")
            continue
        seen[resolved] = line_no
        out.append(LabelledSeries(resolved, rel, int(label)))
    if problems:
        raise LabelsError(path, problems)
    if not out:
        raise LabelsError(path, ["no series listed below the header"])
    return out


def _stack_settings(folder: Path) -> tuple[tuple[float, float, float], HUWindow]:
    sidecar = folder / STACK_SIDECAR
    if not sidecar.is_file():
        return STACK_SPACING_MM, LUNG_WINDOW
    try:
        raw = json.loads(sidecar.read_text(encoding="utf-8"))
        spacing = tuple(float(v) for v in raw.get("spacing_mm", STACK_SPACING_MM))
        window = HUWindow(
            float(raw.get("window_center", LUNG_WINDOW.center)),
            float(raw.get("window_width", LUNG_WINDOW.width)),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise SeriesRejected(f"{sidecar.name} unreadable: {exc}") from exc
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise SeriesRejected(f"{sidecar.name}: spacing_mm must be three positive numbers")
    if window.width <= 0:
        raise SeriesRejected(f"{sidecar.name}: window_width must be positive")
    return (spacing[0], spacing[1], spacing[2]), window


def load_png_stack(folder: str | Path) -> SeriesInput:
    """An ordered stack of 8-bit lung-window PNG slices as HU (see the module docstring)."""
    from PIL import Image

    root = Path(folder)
    files = stack_files(root)
    if not files:
        raise SeriesRejected(f"no PNG slices in {root}")
    spacing, window = _stack_settings(root)
    slices: list[np.ndarray] = []
    for f in files:
        try:
            with Image.open(f) as im:
                if im.mode not in ("L", "P", "RGB", "RGBA", "LA"):
                    raise SeriesRejected(f"{f.name}: {im.mode} image; expected 8-bit grey")
                arr = np.asarray(im.convert("L"), dtype=np.float32)
        except (OSError, ValueError) as exc:
            raise SeriesRejected(f"cannot read {f.name}: {exc}") from exc
        if slices and arr.shape != slices[0].shape:
            raise SeriesRejected(
                f"{f.name} is {arr.shape[1]}x{arr.shape[0]}, the first slice "
                f"{slices[0].shape[1]}x{slices[0].shape[0]}"
            )
        slices.append(arr)
    return SeriesInput(
        hu=unit_to_hu(np.stack(slices) / 255.0, window),
        spacing=spacing,
        slice_ids=[f.name for f in files],
        z_mm=[k * spacing[0] for k in range(len(files))],
        kind="png_stack",
    )


def load_series_input(folder: str | Path) -> SeriesInput:
    """A DICOM series folder, else a PNG stack; ``SeriesRejected`` says why neither works."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"{root} not found")
    if not root.is_dir():
        raise SeriesRejected(f"{root} is not a folder")
    entries = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    pngs = [p for p in entries if p.suffix.lower() in STACK_SUFFIXES]
    if pngs and all(p in pngs or p.name == STACK_SIDECAR for p in entries):
        return load_png_stack(root)
    try:
        files = series_files(root)
    except SeriesRejected:
        raise SeriesRejected(f"{root} holds neither DICOM files nor PNG slices") from None
    volume = load_series(files)
    uids, z_mm = slice_positions(volume)
    return SeriesInput(volume.hu, volume.spacing, uids, z_mm, "dicom", volume.series_instance_uid)


def score_series(
    item: LabelledSeries, predictor: Any, options: ResultOptions | None = None
) -> SeriesScore:
    """Load and analyse one series; every failure becomes a status with a reason."""
    out = SeriesScore(path=item.label, covid=item.covid, status="failed")
    t0 = time.perf_counter()
    try:
        series = load_series_input(item.path)
        out.kind = series.kind
        out.series_instance_uid = series.series_instance_uid
        analysis = analyse_volume(series.hu, series.spacing, predictor, options)
    except SeriesRejected as exc:
        out.status, out.reason = "rejected", exc.reason
    except FileNotFoundError as exc:
        out.reason = str(exc)
    except Exception as exc:  # one unreadable series must not end the evaluation
        logger.debug("%s failed", item.path, exc_info=True)
        out.reason = f"{type(exc).__name__}: {exc}"
    else:
        numbers = analysis.numbers()  # exactly the figures the node's SR would carry
        out.status = "scored"
        out.covid_probability = numbers.covid_probability
        out.predicted_covid = numbers.covid_present
        out.lesion_volume_ml = numbers.lesion_volume_ml
        out.lung_volume_ml = numbers.lung_volume_ml
        out.lung_involvement_percent = numbers.lung_involvement_percent
        out.n_slices = len(analysis.in_lung)
        out.slices = analysis.slice_figures(series.slice_ids, series.z_mm)
    out.seconds = round(time.perf_counter() - t0, 2)
    if out.status == "scored":
        logger.info(
            "%s (covid=%d): p=%.3f, lesions %.1f %% of the lung, %.1f s",
            item.label,
            item.covid,
            out.covid_probability,
            out.lung_involvement_percent,
            out.seconds,
        )
    else:
        logger.warning("%s (covid=%d): %s: %s", item.label, item.covid, out.status, out.reason)
    return out


def summarise(scores: list[SeriesScore], threshold: float, n_boot: int = 2000) -> dict[str, Any]:
    """Series AUC and accuracy / sensitivity / specificity at ``threshold`` over the scored."""
    scored = [s for s in scores if s.status == "scored"]
    labels = np.array([s.covid for s in scored], dtype=int)
    probs = np.array([s.covid_probability for s in scored], dtype=np.float64)
    out: dict[str, Any] = {
        "n": len(scores),
        "n_scored": len(scored),
        "n_rejected": sum(s.status == "rejected" for s in scores),
        "n_failed": sum(s.status == "failed" for s in scores),
        "n_covid": sum(s.covid for s in scores),
        "n_non_covid": sum(1 - s.covid for s in scores),
        "threshold": threshold,
    }
    if scored:
        m = classification_metrics(labels, probs, threshold)
        out.update(
            auc=m["auc"],
            accuracy=m["accuracy"],
            sensitivity=m["sensitivity"],
            specificity=m["specificity"],
            auc_ci95=list(auc_ci(labels, probs, n_boot=n_boot)),
        )
        correct = sum(((s.covid_probability or 0.0) >= threshold) == bool(s.covid) for s in scored)
        out["accuracy_counting_unscored"] = correct / len(scores)
    else:
        out.update(auc=None, accuracy=None, sensitivity=None, specificity=None, auc_ci95=None)
        out["accuracy_counting_unscored"] = 0.0
    return out


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def markdown_table(result: dict[str, Any]) -> str:
    """The evaluation as Markdown: the summary, then one row per series."""
    m = result["metrics"]
    ck = result["checkpoint"]
    lo, hi = (m.get("auc_ci95") or [None, None])[:2]
    lines = [
        "# ctmtl series evaluation",
        "",
        f"- labels: `{result['labels']}`",
        f"- checkpoint: {ck['model_name']} {ck['model_version']} (device UID {ck['device_uid']})",
        f"- evaluated: {result['evaluated']} on {result['device']} ({result['precision']})",
        "",
        "| metric | value |",
        "|---|---|",
        f"| series AUC | {_fmt(m['auc'])} (95% CI {_fmt(lo)}-{_fmt(hi)}) |",
        f"| accuracy @{m['threshold']:g} | {_fmt(m['accuracy'])} |",
        f"| sensitivity @{m['threshold']:g} | {_fmt(m['sensitivity'])} |",
        f"| specificity @{m['threshold']:g} | {_fmt(m['specificity'])} |",
        f"| accuracy, unscored counted wrong | {_fmt(m['accuracy_counting_unscored'])} |",
        f"| series (COVID / non-COVID) | {m['n']} ({m['n_covid']} / {m['n_non_covid']}) |",
        f"| scored / rejected / failed | {m['n_scored']} / {m['n_rejected']} / {m['n_failed']} |",
        "",
        "| series | COVID | status | probability | verdict | lesion % of lung | lesion mL "
        "| slices | reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["series"]:
        verdict = "" if s["predicted_covid"] is None else ("COVID" if s["predicted_covid"] else "-")
        reason = (s["reason"] or "").replace("|", "/")
        lines.append(
            f"| `{s['path']}` | {s['covid']} | {s['status']} | {_fmt(s['covid_probability'])} "
            f"| {verdict} | {_fmt(s['lung_involvement_percent'], 2)} "
            f"| {_fmt(s['lesion_volume_ml'], 1)} | {_fmt(s['n_slices'])} | {reason} |"
        )
    lines += ["", "Research software, not a medical device.", ""]
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def evaluate_series(
    labels_csv: str | Path,
    predictor: Any,
    json_out: str | Path | None = None,
    report_dir: str | Path | None = None,
    options: ResultOptions | None = None,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Score every series of ``labels_csv``; writes the JSON and, with ``report_dir``,
    ``roc.png``, ``report.md`` and ``series.csv``. Raises :class:`LabelsError`."""
    items = read_labels(labels_csv)
    options = options or ResultOptions()
    threshold = options.covid_threshold or float(predictor.metadata.labels.threshold)
    scores = [score_series(item, predictor, options) for item in items]
    meta = predictor.metadata
    result: dict[str, Any] = {
        "labels": str(labels_csv),
        "metrics": summarise(scores, threshold, n_boot),
        "series": [vars(s) for s in scores],
        "failures": [
            {"path": s.path, "status": s.status, "reason": s.reason}
            for s in scores
            if s.status != "scored"
        ],
        "checkpoint": {
            "model_name": meta.model_name,
            "model_version": meta.model_version,
            "device_uid": meta.device_uid,
        },
        "device": str(predictor.device),
        "precision": predictor.precision,
        "evaluated": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    result = json.loads(json.dumps(result, default=_json_default), parse_constant=lambda _: None)
    if report_dir is not None:
        rdir = Path(report_dir)
        rdir.mkdir(parents=True, exist_ok=True)
        _write_text(rdir / "report.md", markdown_table(result))
        with (rdir / "series.csv").open("w", newline="", encoding="utf-8") as fh:
            cols = [
                "path",
                "covid",
                "status",
                "covid_probability",
                "lung_involvement_percent",
                "lesion_volume_ml",
                "reason",
            ]
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(result["series"])
        scored = [s for s in result["series"] if s["status"] == "scored"]
        if result["metrics"]["auc"] is not None:
            write_roc_png(
                np.array([s["covid"] for s in scored]),
                np.array([s["covid_probability"] for s in scored]),
                result["metrics"]["auc"],
                rdir / "roc.png",
                "COVID-19 vs non-COVID (series)",
            )
        result["report_dir"] = str(rdir)
    if json_out is not None:
        _write_text(Path(json_out), json.dumps(result, indent=1, allow_nan=False) + "\n")
    return result


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"cannot write {type(v).__name__} to JSON")
