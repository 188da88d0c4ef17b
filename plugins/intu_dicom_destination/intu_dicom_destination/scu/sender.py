"""C-STORE to one DICOM peer through a small pool of reusable associations.

``DicomSender`` puts the pool (``pool.py``) and the exchange (``exchange.py``) together: each
``send_file`` checks an association out, sends one instance by file path and checks it back in.
An association that died while idle, or during a send, is replaced and the instance retried
once on a fresh one before a result is reported.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from intu_core import SendResult
from intu_dicom_destination.scu.contexts import Key
from intu_dicom_destination.scu.exchange import EchoResult, Exchange
from intu_dicom_destination.scu.pool import IDLE_DUL_DELAY, AssociationPool, NoAssociation
from intu_dicom_destination.scu.settings import DestinationSettings


class DicomSender:
    """Sends instances (Part-10 files) to one peer. Thread-safe; ``close()`` releases all."""

    def __init__(
        self,
        settings: DestinationSettings,
        logger: logging.Logger | None = None,
        *,
        work_dir: Path | None = None,
        idle_poll_s: float = IDLE_DUL_DELAY,
    ) -> None:
        self.settings = settings
        self.logger = logger or logging.getLogger("intu.dicom.sender")
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
        self.exchange = Exchange(settings, self.logger, self.work_dir)
        # idle_poll_s: how often pynetdicom's thread looks at an idle pooled association (see
        # scu.pool): a long-lived sender polls slowly, ``intu dicom send`` at SENDING_DUL_DELAY.
        self.pool = AssociationPool(settings, self.exchange.open, self.logger, idle_poll_s=idle_poll_s)

    @property
    def associations_opened(self) -> int:
        """Associations opened since this sender was made (reuse shows as a small number)."""
        return self.exchange.associations_opened

    @property
    def open_associations(self) -> int:
        """Associations open or opening now."""
        return self.pool.open_associations

    def send_file(
        self,
        path: Path | str,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        transfer_syntax_uid: str | None = None,
    ) -> SendResult:
        """C-STORE the Part-10 file at ``path``; returns what happened (never raises for a
        network or peer problem). UIDs are read from the file meta when not given."""
        path = Path(path)
        if not (sop_class_uid and sop_instance_uid and transfer_syntax_uid):
            try:
                meta = read_file_meta_info(path)
                sop_class_uid = str(meta.MediaStorageSOPClassUID)
                sop_instance_uid = str(meta.MediaStorageSOPInstanceUID)
                transfer_syntax_uid = str(meta.TransferSyntaxUID)
            except (OSError, InvalidDicomError, AttributeError, ValueError, EOFError) as exc:
                return SendResult.permanent(f"{path}: not a DICOM Part-10 file with file meta ({exc})")
        key: Key = (str(sop_class_uid), str(transfer_syntax_uid))
        data: dict[str, Any] = {"sop_instance_uid": sop_instance_uid, "sop_class_uid": sop_class_uid}
        for attempt in (1, 2):
            try:
                pooled = self.pool.checkout(key)
            except NoAssociation as failed:
                return failed.result
            except Exception as exc:  # noqa: BLE001 - a bug must cost one attempt, not the queue
                return self._unexpected(exc, "opening an association for", sop_instance_uid, data)
            try:
                result, keep = self.exchange.store(pooled, path, key, data)
            except BaseException as exc:
                # Whatever went wrong, the pool slot must be given back: a slot lost per such
                # error and, after max_associations of them, every send waits for ever.
                self.pool.discard(pooled)
                if not isinstance(exc, Exception):
                    raise  # KeyboardInterrupt, SystemExit...
                return self._unexpected(exc, "sending", sop_instance_uid, data)
            if keep:
                self.pool.checkin(pooled)
            else:
                self.pool.discard(pooled)
            if result is not None:
                return result
            # The association died under us: once more, on a fresh one.
            self.logger.info(
                "association #%d to %s died during a send; retrying on a new one (attempt %d)",
                pooled.number,
                self.settings.address,
                attempt + 1,
            )
        return SendResult.retryable(
            f"association to {self.settings.address} was aborted twice while sending "
            f"{sop_instance_uid}; will retry later",
            data=data,
        )

    def _unexpected(
        self, exc: Exception, doing: str, sop_instance_uid: str | None, data: dict[str, Any]
    ) -> SendResult:
        self.logger.error(
            "unexpected error while %s %s to %s", doing, sop_instance_uid, self.settings.address, exc_info=exc
        )
        return SendResult.retryable(
            f"unexpected error while {doing} {sop_instance_uid} to {self.settings.address}: "
            f"{type(exc).__name__}: {exc}",
            data=data,
        )

    def echo(self) -> EchoResult:
        """C-ECHO on a separate association: round trip and what the peer negotiated."""
        return self.exchange.echo()

    def close(self) -> None:
        """Release every pooled association and stop the reaper. Idempotent."""
        self.pool.close()
