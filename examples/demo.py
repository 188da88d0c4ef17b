"""Run the example router end to end on this machine, check what arrived, and clean up.

1. generate a small synthetic CT study (pydicom, no downloads);
2. start `intu serve` on examples/ (channels dicom-router and local-pacs);
3. play the modality with `intu dicom send router-inbox STUDY`;
4. wait for every instance to reach the local archive, check the enrichment and the pixel data;
5. stop the engine with SIGTERM and remove the temporary data folder.

Usage: python3 examples/demo.py [--count N] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from intu_dicom_destination.testing import intu_command, wait_for_port, write_ct_series

EXAMPLES = Path(__file__).resolve().parent


def pixel_hash(path: Path) -> str:
    return hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20, help="instances in the study (default 20)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="intu-demo-"))
    env = {**os.environ, "INTU_DATA_DIR": str(work / "data")}
    router_port = int(env.setdefault("ROUTER_PORT", "11113"))
    archive = work / "data" / "archive"
    study = write_ct_series(work / "study", args.count, size_kib=512)
    originals = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: pixel_hash(p) for p in study}
    print(f"generated {len(study)} CT instances in {work / 'study'}")

    server = subprocess.Popen(intu_command(EXAMPLES, "serve"), env=env)
    ok = False
    try:
        try:
            wait_for_port(router_port, timeout=30, proc=server, what="intu serve")
        except (RuntimeError, TimeoutError) as exc:
            sys.exit(str(exc))
        send = intu_command(EXAMPLES, "dicom", "send", "router-inbox", str(work / "study"))
        sent = subprocess.run(send, env=env)
        if sent.returncode != 0:
            print("intu dicom send reported failures", file=sys.stderr)
            return 1
        deadline = time.monotonic() + 60
        while len(list(archive.glob("*.dcm"))) < len(study) and time.monotonic() < deadline:
            time.sleep(0.2)
        arrived = sorted(archive.glob("*.dcm"))
        problems = []
        for path in arrived:
            ds = pydicom.dcmread(path)
            if ds[0x00081090].value != "INTU_PROCESSED":
                problems.append(f"{path.name}: 0008,1090 is {ds[0x00081090].value!r}")
            if ds.InstitutionName != "General Hospital":
                problems.append(f"{path.name}: InstitutionName is {ds.InstitutionName!r}")
            if originals.get(ds.SOPInstanceUID) != hashlib.sha256(ds.PixelData).hexdigest():
                problems.append(f"{path.name}: pixel data differs from what was sent")
        print(f"\narchive: {len(arrived)} of {len(study)} instances arrived in {archive}")
        print("  each with ManufacturerModelName (0008,1090) = INTU_PROCESSED, InstitutionName defaulted")
        print("  to 'General Hospital', and pixel data identical to the original (SHA-256)")
        for problem in problems:
            print(f"  PROBLEM: {problem}")
        ok = len(arrived) == len(study) and not problems
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"intu serve stopped (exit code {code})")
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    print("DEMO OK: every instance routed and enriched" if ok else "DEMO FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
