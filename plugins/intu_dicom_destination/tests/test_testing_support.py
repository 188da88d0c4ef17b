"""The test support is plain modules (the benchmark imports it without pytest), and the pytest
plugin turns a missing peer into a skip, or a failure under INTU_REQUIRE_INTEROP=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from intu_dicom_destination.testing import PeerMissing, Scp, require_tool, write_router_project
from intu_dicom_destination.testing.peers import free_port, wait_for_port


def test_importing_the_test_support_does_not_import_pytest() -> None:
    code = (
        "import sys, intu_dicom_destination.testing, intu_dicom_destination.testing.serve\n"
        "sys.exit('pytest imported' if 'pytest' in sys.modules else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_missing_tool_raises_peer_missing_with_the_reason() -> None:
    with pytest.raises(PeerMissing, match="no-such-dicom-tool not installed"):
        require_tool("no-such-dicom-tool")


MISSING_PEER_TESTS = """
import pytest
from intu_dicom_destination.testing import require_tool

@pytest.fixture
def peer():
    return require_tool("no-such-dicom-tool")

def test_in_the_body():
    require_tool("no-such-dicom-tool")

def test_in_a_fixture(peer):
    pass
"""


@pytest.mark.parametrize(
    ("require", "summary"), [("0", "2 skipped"), ("1", "1 failed, 1 error")], ids=["skip", "fail"]
)
def test_a_missing_peer_skips_or_fails_under_intu_require_interop(
    tmp_path: Path, require: str, summary: str
) -> None:
    (tmp_path / "test_peer.py").write_text(MISSING_PEER_TESTS)
    env = {**os.environ, "INTU_REQUIRE_INTEROP": require}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "test_peer.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert summary in done.stdout.splitlines()[-1], done.stdout
    assert "no-such-dicom-tool not installed" in done.stdout


def test_the_in_process_scp_listens_on_the_port_it_is_given() -> None:
    port = free_port()
    scp = Scp(port=port).start()
    try:
        assert scp.port == port
        wait_for_port(port, timeout=5)
    finally:
        scp.stop()


def test_a_project_without_a_router_port_is_a_destination_only_project(tmp_path: Path) -> None:
    project = write_router_project(tmp_path, router_port=None, pacs_port=11112, retry=None, queue=None)
    assert (project / "channels").is_dir() and not any((project / "channels").iterdir())
    assert "retry" not in (project / "intu.yaml").read_text()
