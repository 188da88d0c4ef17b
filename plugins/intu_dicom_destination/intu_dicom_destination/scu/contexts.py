"""Presentation contexts proposed by the destination, and the one chosen for an instance.

For every (SOP class, transfer syntax) seen, we propose the instance's own transfer syntax and
the uncompressed ones as separate contexts, so that the SCP can accept the compressed bytes as
they are *and* tell us whether it would take uncompressed data; new associations also propose
the pairs seen recently (at most 128 contexts, PS3.8 / pynetdicom's limit). When the SCP accepts
only uncompressed little-endian data for a compressed or big-endian instance, the exchange
converts it (``transcode``).
"""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128

Key = tuple[str, str]  # (SOP class UID, transfer syntax UID)


def contexts_for(first: Key, known: list[Key]) -> tuple[list[PresentationContext], frozenset[Key]]:
    """The contexts to propose for ``first`` and then the ``known`` pairs, within MAX_CONTEXTS;
    and the pairs they cover."""
    wanted: list[tuple[str, tuple[str, ...]]] = []
    proposed: set[Key] = set()
    for sop, ts in [first, *[k for k in known if k != first]]:
        options: list[tuple[str, ...]] = [(ts,)]
        if ts not in UNCOMPRESSED:
            options.append(UNCOMPRESSED)
        else:
            options.append(tuple(u for u in UNCOMPRESSED if u != ts))
        new = [(sop, o) for o in options if (sop, o) not in wanted]
        if len(wanted) + len(new) > MAX_CONTEXTS:
            break
        wanted.extend(new)
        proposed.add((sop, ts))
    return [build_context(sop, list(tss)) for sop, tss in wanted], frozenset(proposed)


def choose_transfer_syntax(accepted: frozenset[Key], key: Key) -> str | None:
    """The transfer syntax to send ``key``'s instance in: its own when accepted, else an
    accepted uncompressed little-endian one (the instance is then converted), else None."""
    sop, ts = key
    if key in accepted:
        return ts
    for plain in UNCOMPRESSED:
        if (sop, plain) in accepted:
            return plain
    return None
