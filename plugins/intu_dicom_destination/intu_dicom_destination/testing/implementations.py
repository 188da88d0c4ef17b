"""More DICOM implementations as peers, from Debian's packages: PixelMed (Java), odil, CTN, GDCM.

Beside DCMTK, Orthanc and pynetdicom (``peers.py``), each implementation here can send (C-STORE
SCU) and echo (C-ECHO SCU) into intu's DICOM source and, where it has a storage SCP, receive from
intu's DICOM destination. A missing program raises ``PeerMissing`` naming the Debian package, which
the pytest plugin turns into a skip, or a failure under ``INTU_REQUIRE_INTEROP=1``.

=========  ===================  ==============================================================
name       Debian package       programs used
=========  ===================  ==============================================================
pixelmed   ``pixelmed-apps``    ``java -cp pixelmed.jar com.pixelmed.network.StorageSOPClassSCU``,
                                ``...VerificationSOPClassSCU``, ``...StorageSOPClassSCPDispatcher``
odil       ``odil``,            ``odil store``, ``odil echo``; a small storage SCP on the
           ``python3-odil``     ``odil`` Python module (``/usr/bin/python3``), written below
ctn        ``ctn``              ``send_image``, ``dicom_echo``, ``simple_storage``
gdcm       ``libgdcm-tools``    ``gdcmscu --store``, ``gdcmscu --echo`` (no storage SCP)
=========  ===================  ==============================================================
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from intu_dicom_destination.testing.peers import (
    INTEROP_ENV,
    Peer,
    PeerMissing,
    find_tool,
    free_port,
    start_process,
    stop_process,
    wait_for_port,
)

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, where python3-odil lives (not the tests' Python)

# odil has a storage SCP class but no program: this one serves one association at a time (odil's
# receive_association listens, accepts one and closes the listener) and writes each instance as
# <SOP Instance UID>.dcm in the transfer syntax it was received in (it accepts every context).
ODIL_STORE_SCP = """\
import sys

import odil

port, folder = int(sys.argv[1]), sys.argv[2]
while True:
    association = odil.Association()
    association.receive_association("v4", port)

    def on_store(request):
        data_set = request.get_data_set()
        uid = data_set.as_string("SOPInstanceUID")[0]
        uid = uid.decode() if isinstance(uid, bytes) else uid
        syntax = data_set.get_transfer_syntax() or "1.2.840.10008.1.2.1"  # as negotiated
        odil.Writer.write_file(data_set, f"{folder}/{uid}.dcm", transfer_syntax=syntax)
        return 0

    echo, store = odil.EchoSCP(association), odil.StoreSCP(association)
    echo.set_callback(lambda request: 0)
    store.set_callback(on_store)
    dispatcher = odil.SCPDispatcher(association)
    dispatcher.set_echo_scp(echo)
    dispatcher.set_store_scp(store)
    try:
        while True:
            dispatcher.dispatch()
    except Exception as exc:  # AssociationReleased / AssociationAborted end the association
        print("association ended:", type(exc).__name__, exc, flush=True)
"""


@dataclass(frozen=True)
class Implementation:
    """One DICOM implementation: how to send files, echo, and (when it can) receive."""

    name: str
    package: str
    receives: bool

    def require(self) -> None:
        """Raise ``PeerMissing`` when its programs are not installed."""
        if self.name == "pixelmed":
            if find_tool("java") is None or not PIXELMED_JAR.is_file():
                raise PeerMissing(f"PixelMed not installed (apt-get install {self.package})")
        elif self.name == "odil":
            if find_tool("odil") is None or not _system_python_has_odil():
                raise PeerMissing(f"odil not installed (apt-get install {self.package})")
        elif self.name == "ctn":
            for tool in ("send_image", "dicom_echo", "simple_storage"):
                if find_tool(tool) is None:
                    raise PeerMissing(f"CTN's {tool} not installed (apt-get install {self.package})")
        elif find_tool("gdcmscu") is None:
            raise PeerMissing(f"gdcmscu not installed (apt-get install {self.package})")

    def store_commands(self, port: int, called: str, calling: str, files: Sequence[Path]) -> list[list[str]]:
        """The command lines that C-STORE ``files`` to 127.0.0.1:``port`` (one or several)."""
        self.require()
        paths = [str(f) for f in files]
        if self.name == "pixelmed":  # one file per run: its command line takes one
            return [
                _pixelmed("StorageSOPClassSCU", "127.0.0.1", str(port), called, calling, p) for p in paths
            ]
        if self.name == "odil":
            return [[_tool("odil"), "store", "127.0.0.1", str(port), calling, called, *paths]]
        if self.name == "ctn":
            return [[_tool("send_image"), "-q", "-a", calling, "-c", called, "127.0.0.1", str(port), *paths]]
        base = [_tool("gdcmscu"), "--store", "--aetitle", calling, "--call", called, "127.0.0.1", str(port)]
        return [[*base, "-i", p] for p in paths]

    def echo_command(self, port: int, called: str, calling: str) -> list[str]:
        """The command line that C-ECHOes 127.0.0.1:``port``."""
        self.require()
        if self.name == "pixelmed":
            return _pixelmed("VerificationSOPClassSCU", "127.0.0.1", str(port), called, calling, "NONSECURE")
        if self.name == "odil":
            return [_tool("odil"), "echo", "127.0.0.1", str(port), calling, called]
        if self.name == "ctn":
            return [_tool("dicom_echo"), "-a", calling, "-c", called, "127.0.0.1", str(port)]
        return [_tool("gdcmscu"), "--echo", "--aetitle", calling, "--call", called, "127.0.0.1", str(port)]

    def start_receiver(self, folder: Path, ae_title: str, log: Path | None = None) -> Peer:
        """Start its storage SCP on a free loopback port, writing what it receives under
        ``folder`` (keep ``log`` out of it); ``ValueError`` when it has none."""
        self.require()
        if not self.receives:
            raise ValueError(f"{self.name} has no storage SCP")
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cwd = None
        if self.name == "pixelmed":
            args = _pixelmed("StorageSOPClassSCPDispatcher", str(port), ae_title, str(folder))
        elif self.name == "odil":
            script = folder.parent / f"odil-store-scp-{port}.py"
            script.write_text(ODIL_STORE_SCP)
            args = [SYSTEM_PYTHON, str(script), str(port), str(folder)]
        else:  # ctn: -s silent, -x where files go (one folder per modality)
            args = [_tool("simple_storage"), "-c", ae_title, "-s", "-x", str(folder), str(port)]
            cwd = folder
        proc = start_process(args, log, cwd=cwd)
        try:
            wait_for_port(port, timeout=60, proc=proc, what=f"{self.name} storage SCP")
        except Exception:
            stop_process(proc)
            raise
        return Peer(port, ae_title, folder, proc)


def run(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one of the command lines above; output captured as text."""
    return subprocess.run(list(args), env=INTEROP_ENV, capture_output=True, text=True, timeout=timeout)


IMPLEMENTATIONS = {
    impl.name: impl
    for impl in (
        Implementation("pixelmed", "pixelmed-apps", receives=True),
        Implementation("odil", "odil python3-odil", receives=True),
        Implementation("ctn", "ctn", receives=True),
        Implementation("gdcm", "libgdcm-tools", receives=False),
    )
}


def _tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        raise PeerMissing(f"{name} not installed")
    return path


def _pixelmed(program: str, *args: str) -> list[str]:
    return [_tool("java"), "-cp", str(PIXELMED_JAR), f"com.pixelmed.network.{program}", *args]


def _system_python_has_odil() -> bool:
    try:
        done = subprocess.run([SYSTEM_PYTHON, "-c", "import odil"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


__all__ = ["IMPLEMENTATIONS", "ODIL_STORE_SCP", "PIXELMED_JAR", "Implementation", "run"]
