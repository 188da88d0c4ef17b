"""pytest fixtures over intu's DICOM test support, and the interop policy.

Loaded in every pytest run of an environment where intu-dicom-destination is installed (the
``pytest11`` entry point), so it imports the peers only when a fixture is used. A test needing a
peer that is not installed (``PeerMissing``) is skipped, or failed when ``INTU_REQUIRE_INTEROP=1``
so that CI cannot pass by skipping.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from intu_dicom_destination.testing.peers import Peer, Scp


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``interop`` marker."""
    config.addinivalue_line(
        "markers", "interop: needs DCMTK or Orthanc (skipped when missing unless INTU_REQUIRE_INTEROP=1)"
    )


def _peer_missing_is_skip() -> Generator[None, object, object]:
    from intu_dicom_destination.testing.peers import PeerMissing

    try:
        return (yield)
    except PeerMissing as exc:
        if os.environ.get("INTU_REQUIRE_INTEROP") == "1":
            pytest.fail(f"{exc} and INTU_REQUIRE_INTEROP=1")
        pytest.skip(str(exc))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    """A fixture that needs a missing peer: skip (or fail under INTU_REQUIRE_INTEROP=1)."""
    return (yield from _peer_missing_is_skip())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """A test that needs a missing peer: skip (or fail under INTU_REQUIRE_INTEROP=1)."""
    return (yield from _peer_missing_is_skip())


@pytest.fixture
def scp_factory() -> Iterator[Callable[..., Scp]]:
    """Start recording in-process SCPs: ``make(**Scp fields)``; all stopped at the end."""
    from intu_dicom_destination.testing.peers import Scp

    started: list[Scp] = []

    def make(**kw: Any) -> Scp:
        scp = Scp(**kw).start()
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()


@pytest.fixture
def ct_files(tmp_path: Path) -> Callable[..., list[Path]]:
    """Write a synthetic CT series into a new tmp folder: ``make(count, size_kib=32, **kw)``."""
    from intu_dicom_destination.testing.samples import write_ct_series

    def make(count: int, size_kib: int = 32, **kw: Any) -> list[Path]:
        return write_ct_series(tmp_path / f"series-{time.monotonic_ns()}", count, size_kib=size_kib, **kw)

    return make


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server cert for 127.0.0.1/localhost, a client cert, an expired server cert, a
    server cert for another name, and an unrelated CA; all PEM files."""
    from intu_dicom_destination.testing.pki import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    """Start DCMTK storescp (storing into a tmp folder), optionally with TLS: ``make(tls=pki)``."""
    from intu_dicom_destination.testing.peers import start_storescp

    peers: list[Peer] = []

    def make(ae_title: str = "DCMTK_SCP", tls: dict[str, Path] | None = None) -> Peer:
        peer = start_storescp(tmp_path / f"storescp-{len(peers)}", ae_title, tls)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Peer]:
    """Orthanc on loopback free ports, storage in tmp, no auth, called-AE check on."""
    from intu_dicom_destination.testing.peers import start_orthanc

    peer = start_orthanc(tmp_path / "orthanc")
    try:
        yield peer
    finally:
        peer.stop()
