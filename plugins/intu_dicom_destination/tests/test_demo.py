"""The README's first command: the example router end to end (examples/demo.py), on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from intu_dicom_destination.testing import free_port

DEMO = Path(__file__).resolve().parents[3] / "examples" / "demo.py"


def test_the_example_router_routes_and_archives_every_instance() -> None:
    pacs = free_port()
    env = {
        **os.environ,
        "ROUTER_PORT": str(free_port()),
        "LOCAL_PACS_PORT": str(pacs),
        "PACS_PORT": str(pacs),
        "TCP_NODELAY": "1",
    }
    done = subprocess.run(
        [sys.executable, str(DEMO), "--count", "6"], env=env, capture_output=True, text=True, timeout=240
    )
    # The demo checks the archive on its own: every instance, edited, pixel data identical.
    assert done.returncode == 0 and "DEMO OK" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "archive: 6 of 6 instances arrived" in done.stdout
