"""The message body codec is public and light: another plugin (e.g. DICOMweb) imports it without
pulling in networking or the CLI."""

from __future__ import annotations

import json
import subprocess
import sys


def test_body_imports_no_networking_and_no_cli() -> None:
    # pydicom itself imports tqdm when it is installed (pydicom.data.download); what matters is
    # that the body adds none of these on top of pydicom.
    code = (
        "import sys, json\n"
        "import pydicom, pydicom.filewriter, pydicom.filereader\n"
        "before = set(sys.modules)\n"
        "import intu_dicom_destination.body\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    added = json.loads(out)
    forbidden = [m for m in added if m.split(".")[0] in ("pynetdicom", "tqdm", "click")]
    assert not forbidden, forbidden
    assert "intu_dicom_destination.body" in added


def test_body_alone_imports_no_pynetdicom_nor_click() -> None:
    code = (
        "import sys, intu_dicom_destination.body\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pynetdicom', 'click')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
