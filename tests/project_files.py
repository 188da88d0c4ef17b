"""Helpers for engine tests: project files on disk, plugins 'installed' as dist-info, waiting."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def fake_distribution(
    site: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str] | None = None
) -> Path:
    """Make ``site`` look like an installed distribution: a *.dist-info with entry points.

    This is exactly what importlib.metadata reads for an installed wheel, so plugin discovery is
    exercised for real without a slow pip install.
    """
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    write(info / "entry_points.txt", f"[intu]\n{lines}\n")
    for name, source in (modules or {}).items():
        write(site / f"{name}.py", source)
    return site


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (asked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
