"""Synthetic DICOM studies for the demo, the tests and the benchmark (no downloads needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


def ct_instance(
    *,
    study_uid: str,
    series_uid: str,
    number: int,
    size_kib: int = 512,
    patient_id: str = "INTU-0001",
    patient_name: str = "Doe^Jane",
    institution: str | None = None,
) -> Dataset:
    """One CT image of about ``size_kib`` KiB of 16-bit pixel data, with distinct pixel values."""
    pixels = max(1, size_kib * 1024 // 2)
    side = int(math.sqrt(pixels))
    rows, cols = side, pixels // side
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20261130"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    if institution is not None:
        ds.InstitutionName = institution
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = 1.0
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024.0
    ds.RescaleSlope = 1.0
    # Values differ per instance so that a mixed-up or truncated image shows in a hash.
    array = (np.arange(rows * cols, dtype=np.uint32) * 7 + number * 131) % 4096
    ds.PixelData = array.astype(np.uint16).tobytes()
    return ds


def write_ct_series(folder: Path, count: int, *, size_kib: int = 512, **kwargs: object) -> list[Path]:
    """Write ``count`` instances of one synthetic CT series as Part-10 files; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        ds = ct_instance(
            study_uid=study_uid,
            series_uid=series_uid,
            number=number,
            size_kib=size_kib,
            **kwargs,  # type: ignore[arg-type]
        )
        path = folder / f"CT{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# SOP Class UID claiming 32767 bytes of value where 12 follow.
TRUNCATED_ELEMENT = b"\x08\x00\x16\x00UI\xff\x7f" + b"1.2" * 4


def write_garbage_instance(
    path: Path, transfer_syntax: str = ExplicitVRLittleEndian, payload: bytes = TRUNCATED_ELEMENT
) -> Path:
    """A Part-10 file with a valid file meta header whose dataset (``payload``) cannot be parsed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), meta)
        f.write(payload)
    return path
