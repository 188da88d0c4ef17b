"""Importing pydicom without what `intu dicom send` never uses: its optional download helper.

pydicom imports ``requests`` (and with it urllib3, charset_normalizer, idna, certifi and the email
package) for ``pydicom.data``'s test-file downloads: 0.08-0.29 s of CPU (3 runs, measured
2026-12-03) of the 0.45-0.72 s that importing pynetdicom costs. Under
``deferred_imports("requests")`` such a module is created empty and executed on first use (the
standard library's ``importlib.util.LazyLoader``), so nothing changes for code that does use it.

numpy cannot be deferred this way: pydicom's pixel decoders (pylibjpeg's plugin discovery) use it
while pydicom is imported, and transcoding needs them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

__all__ = ["deferred_imports"]


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
    """Top-level modules ``names`` first imported inside the block are executed on first
    attribute access instead. Use it from the main thread, around imports only: LazyLoader's
    first access is not meant to race with another thread's."""
    finder = _DeferringFinder(names)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
