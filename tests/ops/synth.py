"""Small synthetic chest CT series (pydicom): a body with two lungs and a lesion.

Big enough for the real pipeline (lung mask > 100 mL, selection rules with
`min_slices` lowered) and small enough that a CPU worker processes one in seconds.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def phantom(n_slices: int, size: int, seed: int) -> np.ndarray:
    """HU volume (Z, Y, X): air, a soft-tissue body, two lungs, a dense blob in one lung."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.34) ** 2 <= 1
    left = ((xx - 0.32) / 0.12) ** 2 + ((yy - 0.5) / 0.22) ** 2 <= 1
    right = ((xx - 0.68) / 0.12) ** 2 + ((yy - 0.5) / 0.22) ** 2 <= 1
    lesion = ((xx - 0.66) / 0.05) ** 2 + ((yy - 0.45) / 0.06) ** 2 <= 1
    vol = np.full((n_slices, size, size), -1000.0, dtype=np.float32)
    for z in range(n_slices):
        img = np.where(body, 40.0, -1000.0)
        img = np.where(left | right, -850.0, img)
        if n_slices // 4 <= z < 3 * n_slices // 4:
            img = np.where(lesion, -300.0, img)
        vol[z] = img + rng.normal(0, 15, size=(size, size))
    return vol


def write_series(
    folder: Path,
    n_slices: int = 8,
    size: int = 64,
    seed: int = 0,
    spacing_mm: float = 5.0,
    thickness_mm: float = 5.0,
    patient_id: str = "OPS-0001",
) -> tuple[str, list[Path]]:
    """Write one CT series (native, explicit VR LE); returns its Series Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = phantom(n_slices, size, seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    now = dt.datetime(2024, 1, 2, 3, 4, 5)
    paths = []
    for z in range(n_slices):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName = "Synthetic^Ops"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = f"ACC{seed:05d}"
        ds.StudyID = "1"
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.Manufacturer = "ctmtl tests"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesDescription = "synthetic chest CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [-size * spacing_mm / 2, -size * spacing_mm / 2, z * thickness_mm]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = thickness_mm
        ds.PixelSpacing = [spacing_mm, spacing_mm]
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = np.round(hu[z]).astype(np.int16).tobytes()
        path = folder / f"{z:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return series, paths
