"""End to end with Orthanc as the PACS: real COVID series in, SEG + SR back into Orthanc.

Orthanc runs from a config JSON in a temp folder on free ports. The series is uploaded
through its REST API and sent to the node with `/modalities/{node}/store`, as an
auto-routing rule would; the node answers with SEG + SR, which the test reads back from
Orthanc and checks with dciodvfy, dcmqi, highdicom and against what the node stored.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.config import NodeConfig
from dicom_node.db import Delivery, DeliveryState, Job, Result
from dicom_node.service import NodeService
from helpers import free_port, orthanc_answers, stop_process, wait_for

ORTHANC = "/usr/sbin/Orthanc"


class Orthanc:
    """An Orthanc server in a temp folder, driven through its REST API."""

    def __init__(self, folder: Path, modalities: dict[str, list[Any]]) -> None:
        if not Path(ORTHANC).exists():
            pytest.skip("Orthanc not installed (apt install orthanc)")
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ctmtl-test-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # HTTP only from this host
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomModalities": modalities,
            "DicomAlwaysAllowEcho": False,  # only the configured node may talk to it
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomScuTimeout": 60,
            "DicomAssociationCloseDelay": 0,
            "Plugins": [],
            "LuaScripts": [],
            "StableAge": 3600,
            "HttpThreadsCount": 4,
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.log = (folder / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(
            [ORTHANC, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for(self._up, 30, "Orthanc REST API")

    def _up(self) -> bool:
        return orthanc_answers(self.proc, self.get)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=300) as resp:
            return bytes(resp.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        return json.loads(self.request("POST", path, json.dumps(payload).encode()))

    def upload(self, path: Path) -> dict[str, Any]:
        return json.loads(
            self.request("POST", "/instances", path.read_bytes(), "application/dicom")
        )

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.log.close()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, list[Any]]], Orthanc]]:
    servers: list[Orthanc] = []

    def start(modalities: dict[str, list[Any]]) -> Orthanc:
        server = Orthanc(tmp_path / f"orthanc{len(servers)}", modalities)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _numbers(content: Any, out: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """(concept meaning, numeric value) of every NUM item in an SR content tree."""
    for item in content or []:
        if item.get("ValueType") == "NUM":
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning
            out.append((str(meaning), float(item.MeasuredValueSequence[0].NumericValue)))
        _numbers(item.get("ContentSequence"), out)
    return out


def _referenced_sop_uids(ds: Dataset) -> set[str]:
    uids: set[str] = set()

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.keyword == "ReferencedSOPInstanceUID":
                uids.add(str(elem.value))
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(ds)
    return uids


@pytest.mark.slow
def test_orthanc_routes_series_and_gets_seg_and_sr_back(
    orthanc_factory: Callable[[dict[str, list[Any]]], Orthanc],
    make_config: Callable[..., NodeConfig],
    start_node: Callable[..., NodeService],
    tiny_checkpoint: Path,
    covid_files: list[Path],
    dciodvfy_errors: Callable[[Path], list[str]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    node_port = free_port()
    pacs = orthanc_factory({"ctmtl": ["CTMTL", "127.0.0.1", node_port]})
    cfg = make_config(
        node={"port": node_port, "ae_title": "CTMTL"},
        allowed_callers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
        completion={"idle_seconds": 2.0},
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu", "precision": "fp32"},
    )
    node = start_node(cfg)

    # the PACS receives the study (REST upload), then routes the series to the node
    for path in covid_files:
        pacs.upload(path)
    studies = pacs.get("/studies")
    assert len(studies) == 1
    study = studies[0]
    [ct_series] = pacs.get(f"/studies/{study}/series")
    assert len(ct_series["Instances"]) == 255
    t0 = time.monotonic()
    job = pacs.post(
        "/modalities/ctmtl/store", {"Resources": [ct_series["ID"]], "Synchronous": True}
    )
    assert job.get("InstancesCount", 255) == 255 and job.get("FailedInstancesCount", 0) == 0

    def results_in_pacs() -> list[dict[str, Any]] | None:
        series = pacs.get(f"/studies/{study}/series")
        found = [s for s in series if s["MainDicomTags"].get("Modality") in ("SEG", "SR")]
        return found if len(found) == 2 else None

    result_series = wait_for(results_in_pacs, 600, "SEG + SR in Orthanc", step=1.0)
    elapsed = time.monotonic() - t0

    # Orthanc holds both objects before the node's association is released and the
    # delivery row committed, so wait for the row rather than assume it
    def delivery_done() -> Delivery | None:
        with node.db.session() as s:
            [d] = s.scalars(select(Delivery)).all()
            return d if d.state == DeliveryState.DONE else None

    delivery = wait_for(delivery_done, 60, "delivery marked done", step=0.2)
    assert delivery.destination == "pacs"
    with node.db.session() as s:
        [row] = s.scalars(select(Result)).all()
        [job_row] = s.scalars(select(Job)).all()
    print(f"routed -> results in PACS: {elapsed:.1f} s; node timings {job_row.timings}")

    files: dict[str, Path] = {}
    for s in result_series:
        [instance] = pacs.get(f"/series/{s['ID']}/instances")
        path = tmp_path / f"{s['MainDicomTags']['Modality']}.dcm"
        path.write_bytes(pacs.request("GET", f"/instances/{instance['ID']}/file"))
        files[s["MainDicomTags"]["Modality"]] = path

    # 1. dciodvfy: no errors in either object
    for modality, path in files.items():
        errors = dciodvfy_errors(path)
        assert errors == [], f"dciodvfy errors in {modality}: {errors[:10]}"

    # 2. highdicom reads both; same patient/study as the source, results identified
    source = pydicom.dcmread(covid_files[0], stop_before_pixels=True)
    seg = hd.seg.segread(files["SEG"])
    sr = hd.sr.srread(files["SR"])
    for ds in (seg, sr):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
    assert seg.SOPInstanceUID == row.seg_sop_instance_uid
    assert sr.SOPInstanceUID == row.sr_sop_instance_uid
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.VerificationFlag == "UNVERIFIED"
    assert seg.get_segment_description(1).SegmentLabel

    # 3. the SR's numbers are the ones the node stored and logged; it references the SEG
    nums = _numbers(sr.ContentSequence, [])
    assert ("Probability", row.covid_probability) in nums
    assert ("Percent of lung volume involved", row.lung_involvement_percent) in nums
    assert ("Volume", row.lesion_volume_ml) in nums
    logged = re.search(
        r"job \d+ done: series (\S+) study (\S+) covid_probability=([\d.]+) "
        r"lesion_volume_ml=([\d.]+)",
        caplog.text,
    )
    assert logged is not None and logged.group(1) == source.SeriesInstanceUID
    assert logged.group(2) == source.StudyInstanceUID
    assert float(logged.group(3)) == pytest.approx(row.covid_probability, abs=5e-5)
    assert float(logged.group(4)) == pytest.approx(row.lesion_volume_ml, abs=5e-3)
    refs = _referenced_sop_uids(sr)
    assert seg.SOPInstanceUID in refs
    assert source.SOPInstanceUID in refs  # and the source series

    # 4. dcmqi converts the SEG; its geometry is the CT's
    out = tmp_path / "dcmqi"
    out.mkdir()
    tool = Path(sys.executable).parent / "segimage2itkimage"
    done = subprocess.run(
        [str(tool), "--inputDICOM", str(files["SEG"]), "--outputDirectory", str(out), "-t", "nrrd"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    images = {p.stem: p for p in out.glob("*.nrrd")}
    assert {"1", "2"} <= set(images), sorted(out.iterdir())  # lesion, lung segments
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in covid_files]
    first = min(headers, key=lambda h: float(h.ImagePositionPatient[2]))
    voxel_ml = 0.703125 * 0.703125 * 1.25 / 1000
    volumes = {}
    for name, image_path in images.items():
        image = sitk.ReadImage(str(image_path))
        assert image.GetSize() == (512, 512, 255)
        np.testing.assert_allclose(image.GetSpacing(), (0.703125, 0.703125, 1.25), atol=1e-3)
        np.testing.assert_allclose(
            image.GetOrigin(), [float(v) for v in first.ImagePositionPatient], atol=1e-3
        )
        np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
        volumes[name] = int(sitk.GetArrayViewFromImage(image).astype(bool).sum()) * voxel_ml
    assert volumes["1"] == pytest.approx(row.lesion_volume_ml, abs=0.01)
    assert volumes["2"] == pytest.approx(row.lung_volume_ml, abs=0.01)
    assert row.lung_volume_ml is not None and row.lung_volume_ml > 1000  # real lungs found
