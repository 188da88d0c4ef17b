"""Real DICOM peers on loopback: a recording in-process SCP, DCMTK storescp, Orthanc.

Used by this plugin's tests and by the benchmark, so nothing here imports pytest: a missing tool
raises ``PeerMissing`` and the pytest plugin (``testing/pytest_plugin.py``) turns that into a skip,
or into a failure when ``INTU_REQUIRE_INTEROP=1`` (as in CI). DCMTK and Orthanc come from Debian
(``apt-get install dcmtk orthanc``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

# Debian's DCMTK waits on delayed ACKs without it (~40 ms per image).
INTEROP_ENV = {**os.environ, "TCP_NODELAY": "1"}
# The pyenv shims also hold pynetdicom's own `storescp`: look for the system tools first.
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin"
UNCOMPRESSED_ONLY = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class PeerMissing(Exception):
    """A peer's program is not installed; ``str(exc)`` says which and how to install it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_tool(name: str) -> str | None:
    """The path of a system binary (DCMTK, Orthanc), or None when it is not installed."""
    return shutil.which(name, path=_SYSTEM_PATH)


def require_tool(name: str) -> str:
    """The path of a system binary; raises ``PeerMissing`` when it is not installed."""
    path = find_tool(name)
    if path is None:
        raise PeerMissing(f"{name} not installed (apt-get install dcmtk orthanc)")
    return path


def _listening_ports() -> set[int] | None:
    """The TCP ports in LISTEN state, from /proc/net/tcp{,6}; None without /proc."""
    ports: set[int] = set()
    found = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as fh:
                found = True
                next(fh, None)
                for line in fh:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports if found else None


def wait_for_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None, what: str = "process"
) -> None:
    """Wait until something listens on ``port``; RuntimeError when ``proc`` exits first,
    TimeoutError after ``timeout`` seconds.

    Read from /proc/net/tcp rather than by connecting: a stray connection is an association
    attempt that a one-association-at-a-time peer (storescp without --fork) would have to serve."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {port}")
        ports = _listening_ports()
        if ports is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
        elif port in ports:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what}: nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


def start_process(
    args: Sequence[str], log: Path | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own session, output appended to ``log`` (discarded without one).

    Its own session so that ``stop_process`` ends the whole group, forked children included
    (storescp --fork runs a process per association)."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            list(args), stdout=out, stderr=subprocess.STDOUT, env=env or INTEROP_ENV, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
    finally:
        if not isinstance(out, int):
            out.close()  # the child keeps its own descriptor


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> None:
    """SIGTERM, SIGKILL after ``grace`` seconds; for a process started by ``start_process`` the
    signals go to its whole group, and what is left of the group is killed at the end."""
    if proc is None:
        return
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # leftovers of the group (forked children), then the leader
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # not a group leader (started elsewhere): the process alone
        if proc.poll() is None:
            proc.send_signal(sig)
    except PermissionError:
        pass


# -- in-process SCP ------------------------------------------------------------------------------
@dataclass
class Received:
    """One instance the ``Scp`` stored: on which association, its UIDs and the dataset."""

    association: int
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset: Any  # the pydicom Dataset as received, with file meta giving its transfer syntax


@dataclass
class Scp:
    """A pynetdicom storage SCP on a loopback port (``port``, or a free one) that records what it saw.

    ``status(n, event)`` returns the status for the n-th C-STORE (1-based); ``abort_on`` lists the
    numbers of C-STOREs during which the SCP aborts the association instead of answering."""

    ae_title: str = "TEST_SCP"
    transfer_syntaxes: list[str] | None = None  # None: pynetdicom's defaults (incl. compressed)
    status: Callable[[int, Any], int] = lambda n, event: 0x0000
    abort_on: set[int] = field(default_factory=set)
    extra_sop_classes: list[str] = field(default_factory=list)
    ssl_context: Any = None
    delay: float = 0.0
    port: int = 0
    associations: list[dict[str, Any]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Scp:
        """Listen (on ``port`` when set, else on a free port) without blocking; returns self."""
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 16
        ae.require_called_aet = True
        kw: dict[str, Any] = (
            {} if self.transfer_syntaxes is None else {"transfer_syntax": self.transfer_syntaxes}
        )
        for cx in StoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, **kw)
        for uid in self.extra_sop_classes:
            ae.add_supported_context(uid, **kw)
        ae.add_supported_context("1.2.840.10008.1.1")
        self.ae = ae
        self.port = self.port or free_port()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_gone),
            (evt.EVT_ABORTED, self._on_gone),
        ]
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        assert server is not None  # block=False: the server runs in its own thread
        self.server = server
        return self

    def stop(self) -> None:
        """Close the listener and every association."""
        self.server.shutdown()

    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self.associations.append(
                {
                    "calling": event.assoc.requestor.ae_title,
                    "contexts": len(event.assoc.accepted_contexts) + len(event.assoc.rejected_contexts),
                }
            )
            event.assoc._intu_number = len(self.associations)
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def _on_gone(self, event: Any) -> None:
        with self._lock:
            if getattr(event.assoc, "_intu_number", None):
                self.active -= 1
                event.assoc._intu_number = None

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self._count += 1
            n = self._count
        if self.delay:
            time.sleep(self.delay)
        if n in self.abort_on:
            event.assoc.abort()
            return 0xC000
        code = self.status(n, event)
        if code in (0x0000, 0xB000, 0xB006, 0xB007, 0x0111):
            with self._lock:
                self.received.append(
                    Received(
                        getattr(event.assoc, "_intu_number", 0) or 0,
                        str(event.request.AffectedSOPInstanceUID),
                        str(event.context.transfer_syntax),
                        _received_dataset(event),
                    )
                )
        return code

    def dataset(self, index: int) -> Any:
        """The dataset of the ``index``-th instance received (0-based)."""
        return self.received[index].dataset


def _received_dataset(event: Any) -> Any:
    # Read fully now: with STORE_RECV_CHUNKED_DATASET on (the DICOM source turns it on for the
    # whole process) the dataset lives in a temporary file that goes away after the handler.
    from pydicom.dataset import FileMetaDataset

    ds = event.dataset
    ds = ds.copy() if hasattr(ds, "copy") else ds
    for elem in ds.iterall():
        _ = elem.value  # load deferred values
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = event.context.transfer_syntax
    return ds


# -- DCMTK and Orthanc -----------------------------------------------------------------------------
@dataclass
class Peer:
    """A DCMTK or Orthanc process: its DICOM port and AE title, storage folder, and (Orthanc) REST port."""

    port: int
    ae_title: str
    folder: Path
    proc: subprocess.Popen[bytes]
    http_port: int = 0

    def stop(self) -> None:
        """End the process (and its forked children)."""
        stop_process(self.proc)

    def get(self, path: str) -> Any:
        """GET ``path`` from Orthanc's REST API: parsed JSON, or the raw bytes."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body


def start_storescp(
    folder: Path,
    ae_title: str = "DCMTK_SCP",
    tls: dict[str, Path] | None = None,
    *,
    ignore: bool = False,
    fork: bool = True,
    extra: Sequence[str] = (),
    log: Path | None = None,
    port: int | None = None,
) -> Peer:
    """Start DCMTK storescp on a free loopback port (or ``port``) storing into ``folder``.

    ``fork``: one process per association, as a PACS serves several senders; ``ignore``: receive
    and discard; ``extra``: more storescp options (e.g. ``+B``, bit-preserving); ``tls``: the files
    of ``make_pki``; ``log``: where its output goes (keep it out of ``folder``, which holds only
    what arrived); ``port``: a PACS that comes up where a destination already points."""
    exe = require_tool("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port() if port is None else port
    args = [exe, "--aetitle", ae_title, "--output-directory", str(folder)]
    if fork:
        args.append("--fork")
    if ignore:
        args.append("--ignore")
    if tls is not None:
        args += [
            "+tls", str(tls["server_key"]), str(tls["server"]),
            "+cf", str(tls["ca"]), "--require-peer-cert",
        ]  # fmt: skip
    args += [*extra, str(port)]
    proc = start_process(args, log)
    try:
        wait_for_port(port, proc=proc, what="storescp")
    except Exception:
        stop_process(proc)
        raise
    return Peer(port, ae_title, folder, proc)


def start_orthanc(
    folder: Path,
    *,
    ae_title: str = "ORTHANC",
    lua: str | None = None,
    close_delay: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Peer:
    """Orthanc on free loopback ports, storage in ``folder``, no auth, called-AE check on; ready
    when its REST API answers. Its log is ``folder/orthanc.log``.

    ``lua``: a Lua script it runs (e.g. ``OnStoredInstance`` forwarding); ``close_delay``: its
    ``DicomAssociationCloseDelay`` in seconds; ``extra``: more configuration, overriding ours."""
    exe = require_tool("Orthanc")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config: dict[str, Any] = {
        "Name": "intu-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        "DicomCheckCalledAet": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "HttpServerEnabled": True,
        "Plugins": [],
        "StorageCompression": False,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
    }
    if lua is not None:
        (folder / "script.lua").write_text(lua)
        config["LuaScripts"] = [str(folder / "script.lua")]
    if close_delay is not None:
        config["DicomAssociationCloseDelay"] = close_delay
    config.update(extra or {})
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    proc = start_process([exe, str(folder / "orthanc.json")], folder / "orthanc.log", cwd=folder)
    peer = Peer(dicom_port, ae_title, folder, proc, http_port)
    try:
        _wait_for_rest(peer, timeout=60)
        wait_for_port(dicom_port, timeout=30, proc=proc, what="Orthanc")
    except Exception:
        stop_process(proc)
        raise
    return peer


def _wait_for_rest(peer: Peer, timeout: float) -> None:
    # Its HTTP port opens before the database is ready: wait for an answer, not for the port.
    deadline = time.monotonic() + timeout
    while True:
        if peer.proc.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with status {peer.proc.returncode}: see {peer.folder}/orthanc.log"
            )
        try:
            peer.get("/system")
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Orthanc did not answer on HTTP {peer.http_port} after {timeout:.0f} s")
        time.sleep(0.1)
