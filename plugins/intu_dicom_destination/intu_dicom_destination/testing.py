"""Real DICOM peers for tests: a recording in-process SCP, DCMTK storescp, Orthanc, a test PKI.

Used by this plugin's tests, the engine's end-to-end tests and the benchmark. DCMTK and Orthanc
come from Debian (`apt-get install dcmtk orthanc`); ``require_tool`` skips a test when one is
missing, or fails it when ``INTU_REQUIRE_INTEROP=1`` (as in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

# Debian's DCMTK waits on delayed ACKs without it (~40 ms per image).
INTEROP_ENV = {**os.environ, "TCP_NODELAY": "1"}
# The pyenv shims also hold pynetdicom's own `storescp`: look for the system tools first.
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tool(name: str) -> str:
    """The path of a system binary; skips the test (with the reason) when it is missing, but fails
    when INTU_REQUIRE_INTEROP=1 so that CI cannot pass by skipping."""
    path = shutil.which(name, path=_SYSTEM_PATH)
    if path is None:
        message = f"{name} not installed (apt-get install dcmtk orthanc)"
        if os.environ.get("INTU_REQUIRE_INTEROP") == "1":
            pytest.fail(message + " and INTU_REQUIRE_INTEROP=1")
        pytest.skip(message)
    return path


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


# -- in-process SCP ------------------------------------------------------------------------------
@dataclass
class Received:
    association: int
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset: Any  # the pydicom Dataset as received, with file meta giving its transfer syntax


@dataclass
class Scp:
    """A pynetdicom storage SCP on a free loopback port that records what it saw.

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
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 16
        ae.require_called_aet = True
        kw = {} if self.transfer_syntaxes is None else {"transfer_syntax": self.transfer_syntaxes}
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, **kw)
        for uid in self.extra_sop_classes:
            ae.add_supported_context(uid, **kw)
        ae.add_supported_context("1.2.840.10008.1.1")
        self.ae = ae
        self.port = free_port()
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_gone),
            (evt.EVT_ABORTED, self._on_gone),
        ]
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
        )
        return self

    def stop(self) -> None:
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


UNCOMPRESSED_ONLY = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server cert for 127.0.0.1/localhost, a client cert, an expired server cert, a
    server cert for another name, and an unrelated CA; all PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    out: dict[str, Path] = {}

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(name: str, k: Any) -> None:
        path = folder / f"{name}.key"
        path.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        out[f"{name}_key"] = path

    def write_cert(name: str, cert: Any) -> None:
        path = folder / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[name] = path

    def ca(name: str) -> tuple[Any, Any]:
        k = key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def leaf(
        ca_key: Any, ca_cert: Any, cn: str, sans: list[Any], *, expired: bool = False, client=False
    ) -> Any:
        k = key()
        before = now - datetime.timedelta(days=10 if expired else 1)
        after = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=30)
        usage = (
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(before)
            .not_valid_after(after)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return k, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("intu test CA")
    write_cert("ca", ca_cert)
    _, other_ca = ca("some other CA")
    write_cert("other_ca", other_ca)
    local = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    for name, cn, sans, expired, client in [
        ("server", "pacs", local, False, False),
        ("expired", "pacs", local, True, False),
        ("wrong_host", "pacs.example.org", [x509.DNSName("pacs.example.org")], False, False),
        ("client", "INTU_SCU", [], False, True),
    ]:
        k, cert = leaf(ca_key, ca_cert, cn, sans, expired=expired, client=client)
        write_cert(name, cert)
        write_key(name, k)
    return out


# -- DCMTK and Orthanc -----------------------------------------------------------------------------
@dataclass
class Peer:
    port: int
    ae_title: str
    folder: Path
    proc: subprocess.Popen[bytes]
    http_port: int = 0

    def stop(self) -> None:
        stop_process(self.proc)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_storescp(
    folder: Path, ae_title: str = "DCMTK_SCP", tls: dict[str, Path] | None = None, *, ignore: bool = False
) -> Peer:
    """Start DCMTK storescp on a free loopback port storing into ``folder`` (``--fork``: one
    process per association, as a PACS serves several senders), optionally with TLS from ``make_pki``."""
    exe = require_tool("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [exe, "--aetitle", ae_title, "--output-directory", str(folder), "--fork"]
    if ignore:
        args.append("--ignore")
    if tls is not None:
        args += [
            "+tls", str(tls["server_key"]), str(tls["server"]),
            "+cf", str(tls["ca"]), "--require-peer-cert",
        ]  # fmt: skip
    args.append(str(port))
    proc = subprocess.Popen(args, env=INTEROP_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc=proc)
    except Exception:
        stop_process(proc)
        raise
    return Peer(port, ae_title, folder, proc)


def start_orthanc(folder: Path, *, ae_title: str = "ORTHANC", extra: dict[str, Any] | None = None) -> Peer:
    """Orthanc on free loopback ports, storage in ``folder``, no auth, called-AE check on."""
    exe = require_tool("Orthanc")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
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
    config.update(extra or {})
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen([exe, str(folder / "orthanc.json")], env=INTEROP_ENV, stdout=log, stderr=log)
    try:
        wait_for_port(http_port, timeout=30, proc=proc)
        wait_for_port(dicom_port, timeout=30, proc=proc)
    except Exception:
        stop_process(proc)
        raise
    finally:
        log.close()  # the child keeps its own descriptor
    return Peer(dicom_port, ae_title, folder, proc, http_port)
