"""C-STORE response statuses: category and meaning, and the ``SendResult`` each one means.

Meanings come from PS3.4 Annex B (Storage Service Class) and PS3.7 Annex C (general statuses),
as tabulated by ``pynetdicom.status``; we do not invent our own.
"""

from __future__ import annotations

from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

from intu_core import SendResult

SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111


def meaning(code: int) -> str:
    """The standard's meaning of a C-STORE status code ("Unknown status" when it has none)."""
    for table in (STORAGE_SERVICE_CLASS_STATUS, GENERAL_STATUS):
        if code in table:
            return table[code][1] or ("Success" if code == SUCCESS else "Cancel")
    return "Unknown status"


def describe(code: int, comment: str = "") -> str:
    """``0xC000 Cannot Understand`` plus the peer's error comment, if any."""
    text = f"0x{code:04X} {meaning(code)}"
    comment = (comment or "").strip()
    return f"{text} ({comment})" if comment else text


def is_retryable_failure(code: int) -> bool:
    """A failure status after which the same instance may be accepted later."""
    # Out of resources (PS3.4 B.2.3): the SCP may accept the same instance later.
    # 0x0213 Resource Limitation is the general-status counterpart.
    return 0xA700 <= code <= 0xA7FF or code == 0x0213


def result_for_status(code: int, comment: str = "", *, duplicate_is_success: bool = True) -> SendResult:
    """What a C-STORE response status means for the message.

    0x0000 → success; 0xBxxx (0xB000, 0xB006, 0xB007...) → warning (delivered); 0x0111
    duplicate → success (or permanent when ``duplicate_is_success`` is false); 0xA7xx → retryable;
    every other failure → permanent, with the code and its meaning in the detail.
    """
    text = describe(code, comment)
    data = {"status": code, "status_meaning": meaning(code)}
    if comment:
        data["error_comment"] = comment
    if code == SUCCESS:
        return SendResult.success("stored", code=code, data=data)
    if 0xB000 <= code <= 0xBFFF:  # warnings (PS3.4 B.2.3: 0xB000, 0xB006, 0xB007; PS3.7 C: Bxxx)
        return SendResult.warning(f"stored with warning {text}", code=code, data=data)
    if code == DUPLICATE_SOP_INSTANCE:
        if duplicate_is_success:
            return SendResult.success(f"already stored: {text}", code=code, data=data)
        return SendResult.permanent(
            f"rejected: {text} (set duplicate_is_success: true to count it as delivered)",
            code=code,
            data=data,
        )
    if is_retryable_failure(code):
        return SendResult.retryable(f"refused for now: {text}", code=code, data=data)
    if code in (0xFF00, 0xFF01):
        # Pending is not a valid final C-STORE status; the peer is broken.
        return SendResult.permanent(f"invalid final status {text}", code=code, data=data)
    return SendResult.permanent(f"rejected: {text}", code=code, data=data)
