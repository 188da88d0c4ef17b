"""The `dicom` destination: turns each message into a Part-10 file and C-STOREs it."""

from __future__ import annotations

from intu_core import Message, Runtime, SendResult
from intu_dicom_destination.body import InvalidBody, prepare_for_send
from intu_dicom_destination.scu.exchange import EchoResult
from intu_dicom_destination.scu.sender import DicomSender
from intu_dicom_destination.scu.settings import DestinationSettings
from intu_dicom_destination.shared.tls import TlsConfigError


class DicomDestination:
    """A configured DICOM destination (C-STORE SCU) with its association pool.

    ``send`` is thread-safe: each queue worker checks its own association out of the pool
    (at most ``max_associations`` at a time); ``close`` releases them all."""

    def __init__(self, settings: DestinationSettings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.work_dir = runtime.data_dir / "dicom" / "outgoing"
        try:
            self.sender = DicomSender(settings, runtime.logger, work_dir=self.work_dir)
        except TlsConfigError as exc:
            # A certificate or key that cannot be used: refuse to start rather than dead-letter
            # every message (the engine reports this as a configuration error).
            raise TlsConfigError(f"destination {runtime.name!r}: {exc}") from None
        self._remove_leftovers()
        self._bytes_sent = runtime.metrics.counter(
            "intu_bytes_sent_total", "Bytes of instances a destination delivered", ["destination"]
        ).labels(runtime.name)
        runtime.metrics.gauge(
            "intu_dicom_scu_open_associations",
            "Associations a DICOM destination holds open (idle or sending) now",
            ["destination"],
        ).labels(runtime.name).set_function(lambda: self.sender.open_associations)

    def _remove_leftovers(self) -> None:
        """Delete the temporary files a crash left in the work folder.

        Only temporary files live there (edited copies, decompressed copies), each deleted once
        its send is over; the engine creates its destinations before any of them sends."""
        try:
            entries = list(self.work_dir.iterdir()) if self.work_dir.is_dir() else []
        except OSError as exc:
            self.runtime.logger.warning("cannot list %s: %s", self.work_dir, exc.strerror or exc)
            return
        removed = 0
        for entry in entries:
            try:
                if entry.is_symlink() or entry.is_file():
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # another destination's clean-up was first: they share the folder
            except OSError as exc:
                self.runtime.logger.warning("cannot delete leftover %s: %s", entry, exc.strerror or exc)
        if removed:
            self.runtime.logger.info("deleted %d leftover temporary file(s) in %s", removed, self.work_dir)

    def send(self, message: Message) -> SendResult:
        """C-STORE the message's instance; what happened, as a result (never raises)."""
        try:
            prepared = prepare_for_send(message.body, self.work_dir)
        except InvalidBody as exc:
            return SendResult.permanent(f"not a DICOM instance this destination can send: {exc}")
        except OSError as exc:  # e.g. a full disk while writing an edited copy: it may clear up
            return SendResult.retryable(
                f"cannot prepare the instance in {self.work_dir}: {exc.strerror or exc}"
            )
        try:
            result = self.sender.send_file(
                prepared.path,
                prepared.sop_class_uid,
                prepared.sop_instance_uid,
                prepared.transfer_syntax_uid,
            )
            if result.delivered:
                self._bytes_sent.inc(prepared.path.stat().st_size)
        finally:
            prepared.cleanup()
        data = {
            **result.data,
            "sop_instance_uid": prepared.sop_instance_uid,
            "sop_class_uid": prepared.sop_class_uid,
            "called_ae_title": self.settings.called_ae_title,
            "calling_ae_title": self.settings.ae_title,
            "peer": self.settings.address,
        }
        return SendResult(result.status, result.detail, result.code, data)

    def echo(self) -> EchoResult:
        """C-ECHO the peer on a separate association."""
        return self.sender.echo()

    def probe(self) -> SendResult:
        """Whether the peer can be reached, by a C-ECHO (the delivery workers call it while the
        destination is down, instead of sending each queued instance). Never raises.

        Success when the association was accepted, even if the C-ECHO itself failed: the peer is
        reachable and the next C-STORE says the rest. Unreachable (retryable) or permanent (the
        peer rejects our AE title, or refuses Verification: the probe cannot tell) otherwise."""
        try:
            echo = self.sender.echo()
        except Exception as exc:  # noqa: BLE001 - a probe that raises would stop probing
            self.runtime.logger.debug("C-ECHO to %s raised", self.settings.address, exc_info=True)
            return SendResult.unreachable(
                f"C-ECHO to {self.settings.address} failed: {type(exc).__name__}: {exc}"
            )
        if echo.failure is not None:
            return echo.failure
        if echo.ok:
            return SendResult.success(f"C-ECHO answered in {echo.round_trip_ms or 0:.0f} ms", code=0)
        return SendResult.success(f"association accepted, but {echo.detail}", code=echo.status)

    def close(self) -> None:
        """Release the pooled associations."""
        self.sender.close()
