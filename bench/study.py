"""The studies the benchmark sends: N synthetic CT instances, and one 1 GiB instance."""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from intu_dicom_destination.testing import ct_instance, write_ct_series
from measure import log
from pydicom import dcmread
from pydicom.uid import generate_uid

MIB = 1024 * 1024
INSTANCE_KIB = 512


@dataclass(frozen=True)
class Study:
    """The study on disk: its folder, its size in bytes, the SOP Instance UIDs it holds."""

    folder: Path
    total_bytes: int
    uids: frozenset[str]

    def received_uids_check(self, out_dir: Path) -> dict[str, Any]:
        """Compare storescp's file names (``<modality>.<SOP Instance UID>``) with the study."""
        got = set()
        for name in os.listdir(out_dir):
            prefix, _, uid = name.partition(".")
            got.add(uid or prefix)
        return {
            "uids_match": got == self.uids,
            "missing": len(self.uids - got),
            "unexpected": len(got - self.uids),
        }


def generate_study(folder: Path, count: int) -> Study:
    """``count`` instances of 512 KiB in one series, then read once to warm the page cache (so
    that the first sender does not pay for it alone)."""
    t0 = time.perf_counter()
    paths = write_ct_series(folder, count, size_kib=INSTANCE_KIB)
    total = sum(p.stat().st_size for p in paths)
    heads = (dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]) for p in paths)
    uids = frozenset(str(ds.SOPInstanceUID) for ds in heads)
    log(f"generated {count} instances ({total / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(4 * MIB):
                pass
    return Study(folder, total, uids)


def generate_big_instance(folder: Path, size_bytes: int = 1024 * MIB) -> Path:
    """One CT instance with ``size_bytes`` of pixel data, written without holding it in memory:
    the Part-10 header through pydicom (no PixelData), then the PixelData element header and
    the bytes in 8 MiB chunks."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = ct_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size_kib=1)
    del ds.PixelData
    pixels = size_bytes // 2
    cols = 32768
    rows = pixels // cols
    assert rows <= 0xFFFF and rows * cols * 2 == size_bytes, "size must be a multiple of 64 KiB, <= 4 GiB"
    ds.Rows, ds.Columns = rows, cols
    path = folder / "CT-1GiB.dcm"
    ds.save_as(path, enforce_file_format=True)
    chunk = bytes(range(256)) * (8 * MIB // 256)
    with open(path, "ab") as fh:
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length.
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size_bytes))
        left = size_bytes
        while left:
            n = min(left, len(chunk))
            fh.write(chunk[:n])
            left -= n
    return path
