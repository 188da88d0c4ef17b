"""Fixtures over the real peers of ``intu_dicom_destination.testing``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from intu_dicom_destination.testing import Peer, Scp, make_pki, start_orthanc, start_storescp


@pytest.fixture
def scp_factory() -> Iterator[Callable[..., Scp]]:
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
    from intu_dicom_destination.samples import write_ct_series

    def make(count: int, size_kib: int = 32, **kw: Any) -> list[Path]:
        return write_ct_series(tmp_path / f"series-{time.monotonic_ns()}", count, size_kib=size_kib, **kw)

    return make


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server cert for 127.0.0.1/localhost, a client cert, an expired server cert, a
    server cert for another name, and an unrelated CA; all PEM files."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    """Start DCMTK storescp (storing into a tmp folder), optionally with TLS: ``make(tls=pki)``."""
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
    peer = start_orthanc(tmp_path / "orthanc")
    try:
        yield peer
    finally:
        peer.stop()
