"""AE titles: the one check both the destination and the source settings use."""

from __future__ import annotations

from intu_core import REQUIRED, Section


def ae_title_problem(value: str) -> str | None:
    """What is wrong with an AE title (PS3.5 AE VR: 1..16 characters, no backslash, no control
    characters, not only spaces), or None when it is fine."""
    if not value.strip(" "):
        return f"expected an AE title of 1 to 16 characters, found {value!r} (empty or only spaces)"
    if len(value) > 16:
        return f"expected an AE title of at most 16 characters, found {len(value)} ({value!r})"
    if "\\" in value:
        return f"expected an AE title without a backslash, found {value!r}"
    if any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        return f"expected an AE title of printable ASCII characters, found {value!r}"
    return None


def read_ae_title(section: Section, key: str, default: str | object = REQUIRED) -> str:
    """Read and validate an AE title at ``key``; records a problem and returns ``default``
    (or "") when it is invalid. Used by both the destination and the source settings."""
    value = section.str(key, default)
    if value is None:
        return default if isinstance(default, str) else ""
    problem = ae_title_problem(value)
    if problem:
        section.error(key, problem)
        return default if isinstance(default, str) else ""
    return value
