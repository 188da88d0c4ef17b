"""pynetdicom's log level, set once for both sides."""

from __future__ import annotations

import logging


def quiet_pynetdicom() -> None:
    """pynetdicom logs two INFO lines per C-STORE ('Sending Store Request', 'Received Store
    Response'; the SCP side likewise). Keep them only when intu runs at debug level."""
    pn = logging.getLogger("pynetdicom")
    if pn.level == logging.NOTSET and logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        pn.setLevel(logging.WARNING)
