"""The core's tests do not use the DICOM plugin: they run on a machine without it, and a change
to the plugin cannot break them. The DICOM system tests live in plugins/intu_dicom_destination/tests."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PLUGIN = "intu_dicom_destination"


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (function-level too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_core_test_module_imports_the_dicom_plugin() -> None:
    offenders = [
        f"{path.relative_to(TESTS)} imports {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in sorted(imported_modules(path))
        if name.split(".")[0] == PLUGIN
    ]
    where = "plugins/intu_dicom_destination/tests"
    assert offenders == [], f"move these tests to {where}: " + "; ".join(offenders)


def test_the_check_sees_a_function_level_import(tmp_path: Path) -> None:
    module = tmp_path / "test_x.py"
    module.write_text("def test():\n    from intu_dicom_destination.testing import Scp\n")
    assert imported_modules(module) == {"intu_dicom_destination.testing"}
