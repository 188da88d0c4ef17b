"""What `intu dicom send` sends for a path: the files under it, and for each file either what
one raw walk found (``body.rawscan``, checked) or its file meta's UIDs, or why it is skipped.

Light to import (no pydicom until a file needs it): the command lists the files and starts
looking at them (``cli.lookahead``) before it imports pydicom and pynetdicom."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from intu_dicom_destination.body.rawscan import Scanned, scan

__all__ = ["look", "meta", "walk"]


def walk(paths: Iterable[Path]) -> Iterator[Path]:
    """The files given and, recursively in name order, the files of the folders given."""
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def meta(path: Path) -> tuple[str, str, str] | str:
    """(SOP class, SOP instance, transfer syntax) of a Part-10 file, or why it is not one."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    try:
        # Only the file meta group (0002): not the rest of the header (2x faster per file).
        found = read_file_meta_info(path)
        return (
            str(found.MediaStorageSOPClassUID),
            str(found.MediaStorageSOPInstanceUID),
            str(found.TransferSyntaxUID),
        )
    except (InvalidDicomError, AttributeError, ValueError, EOFError) as exc:
        return f"not a DICOM Part-10 file ({type(exc).__name__})"
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"


def look(path: Path) -> Scanned | tuple[str, str, str] | str:
    """What to send for ``path``, or why it is skipped. One walk of the raw elements decides most
    files (their checks done, see ``body.rawscan``); the others are read with pydicom, here for the
    file meta and by the sender for the checks (``scu.checks.check_local_file``)."""
    try:
        scanned = scan(path)
    except OSError:
        scanned = None  # meta says why
    return scanned if scanned is not None else meta(path)
