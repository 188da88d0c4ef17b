"""Importing pydicom and pynetdicom with less start-up work, for `intu dicom send`.

`intu dicom send` spends most of its first half second importing them, about what DCMTK's
storescu needs for a whole study. What a plain send never uses is not done:

* ``deferred_imports``: pydicom imports ``requests`` (and with it urllib3, charset_normalizer,
  idna, certifi and the email package) and ``tqdm`` for ``pydicom.data``'s test-file downloads:
  0.08-0.29 s of CPU (3 runs, measured 2026-12-03) of the 0.45-0.72 s that importing pynetdicom
  costs. Under ``deferred_imports(...)`` such a module is created empty and executed on first
  use (the standard library's ``importlib.util.LazyLoader``), so nothing changes for code that
  does use it.
* ``send_imports``: the cyclic garbage collector off while importing (imports allocate
  hundreds of thousands of objects and free few of them), OpenBLAS's thread pool not started
  (numpy starts one at import and it spins ~0.1 s of CPU on the other core, which the file
  walk of ``cli.lookahead`` uses then), and pynetdicom's own UIDs (hundreds of constants, each
  checked against a regular expression when it is built) not checked while it is imported.
  Also deferred there: ``pydicom.examples`` (it looks up its 13 sample files when imported)
  and the legacy ``pylibjpeg_handler`` of ``pydicom.pixel_data_handlers`` (pydicom 3 decodes
  through ``pydicom.pixels``; the old handlers are used only when asked for). And the installed
  distributions' entry points are read once: pylibjpeg reads all of them (~6 ms for 136
  distributions, measured 2026-12-03) for each of its plugin look-ups while pydicom is imported.

numpy cannot be deferred: pydicom's pixel decoders (pylibjpeg's plugin discovery) use it while
pydicom is imported, and transcoding needs them.
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from types import ModuleType
from typing import Any

__all__ = ["deferred_imports", "entry_points_read_once", "send_imports"]


class _DeferringFinder(importlib.abc.MetaPathFinder):
    """Finds ``names`` as the other finders do, with their loader wrapped in a LazyLoader."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)
        self._finding = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names or self._finding:
            return None
        self._finding = True  # find_spec below asks the meta path again, this finder included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


@contextmanager
def deferred_imports(*names: str) -> Iterator[None]:
    """Modules ``names`` (top-level or not) first imported inside the block are executed on first
    attribute access instead. Use it from the main thread, around imports only: LazyLoader's
    first access is not meant to race with another thread's."""
    finder = _DeferringFinder(names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


# Imported by pydicom, used by a send only when it does something rare (see the module's docstring).
_DEFERRED = ("requests", "tqdm", "pydicom.examples", "pydicom.pixel_data_handlers.pylibjpeg_handler")


@contextmanager
def entry_points_read_once() -> Iterator[None]:
    """Inside the block, ``importlib.metadata.entry_points(...)`` reads the installed
    distributions once and answers later calls from what it read (the same selection). For
    imports only: a distribution installed meanwhile is not seen until the block ends."""
    read = metadata.entry_points
    found: Any = None

    def entry_points(**params: Any) -> Any:
        nonlocal found
        if not params:  # everything, a fresh object the caller may change
            return read()
        if found is None:
            found = read()
        return found.select(**params)

    metadata.entry_points = entry_points  # type: ignore[assignment]
    try:
        yield
    finally:
        metadata.entry_points = read


@contextmanager
def send_imports() -> Iterator[None]:
    """Import pynetdicom (and pydicom) inside this block with less work (see the module's
    docstring); what is loaded is then frozen (``gc.freeze``): it lives until the process ends.

    For a command that imports them once and then sends: ``intu dicom send``. OpenBLAS keeps
    one thread for the whole process (numpy's linear algebra is not used by a send, and its
    pixel conversions do not use OpenBLAS)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    collecting = gc.isenabled()
    gc.disable()
    try:
        with entry_points_read_once(), deferred_imports(*_DEFERRED):
            import pydicom.config

        settings = pydicom.config.settings
        mode = settings.reading_validation_mode
        settings.reading_validation_mode = pydicom.config.IGNORE
        try:
            yield
        finally:
            settings.reading_validation_mode = mode
        # Frozen, the collector no longer walks it: not in the forked workers (their pages stay
        # shared) nor at exit, where it cost ~0.1 s of CPU with pydicom and numpy loaded
        # (measured 2026-12-03).
        gc.freeze()
    finally:
        if collecting:
            gc.enable()
