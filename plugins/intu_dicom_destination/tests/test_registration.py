"""Registering the DICOM types and commands is light: every `intu` command loads every plugin, and
only the ones that talk DICOM may pay for pynetdicom and pydicom (and numpy, requests, pylibjpeg
that pydicom pulls in): ~0.5 s of CPU at start-up."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from intu_dicom_destination.registration import DESTINATION_TYPE, SOURCE_TYPE
from intu_dicom_destination.scp.settings import SourceSettings, parse_source_settings
from intu_dicom_destination.scu.settings import DestinationSettings, parse_destination_settings
from intu_dicom_destination.testing import free_port

from intu_core.types import Runtime

HEAVY = ("pynetdicom", "pydicom", "numpy", "requests", "pylibjpeg")

PROJECT = """\
data_dir: data
destinations:
  pacs:
    type: dicom
    dicom: {{host: 127.0.0.1, port: 11112, called_ae_title: PACS}}
"""
CHANNEL = """\
name: in
source:
  type: dicom
  dicom: {{port: {port}}}
destinations: [pacs]
"""


def _heavy_modules_after(code: str) -> list[str]:
    """The heavy top-level modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    return [m for m in HEAVY if m in loaded]


def test_loading_the_plugin_and_a_dicom_project_imports_no_dicom_library(tmp_path: Path) -> None:
    (tmp_path / "intu.yaml").write_text(PROJECT.format())
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "in.yaml").write_text(CHANNEL.format(port=free_port()))
    code = (
        "from pathlib import Path\n"
        "from intu_core.plugins import load_plugins\n"
        "from intu_core.config.project import load_project\n"
        "registry = load_plugins()\n"
        "registry.commands()\n"
        f"project = load_project(Path({str(tmp_path)!r}), registry)\n"
        "assert project.destination_settings('pacs')[0] == 'dicom'\n"
    )
    assert _heavy_modules_after(code) == []


def test_intu_help_and_plugins_import_no_dicom_library() -> None:
    for args in (["--help"], ["plugins"], ["dicom", "--help"], ["dicom", "send", "--help"]):
        code = (
            "from intu_core.cli import cli\n"
            f"try:\n    cli.main({args!r}, prog_name='intu')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
        )
        assert _heavy_modules_after(code) == [], args


def test_the_send_command_imports_pynetdicom_once_before_forking_without_requests() -> None:
    # The forked workers share what the parent imported; requests is pydicom's optional download
    # helper, imported only if something uses it.
    code = (
        "from intu_dicom_destination.shared.imports import deferred_imports\n"
        "with deferred_imports('requests'):\n"
        "    from intu_dicom_destination.cli.send import run_send\n"
        "import sys\n"
        "assert 'urllib3' not in sys.modules and 'charset_normalizer' not in sys.modules\n"
    )
    assert {"pynetdicom", "pydicom"} <= set(_heavy_modules_after(code))


def test_a_deferred_module_is_loaded_on_first_use(tmp_path: Path) -> None:
    """With a module of our own (``requests``, which ``intu dicom send`` defers, is optional and
    absent from a clean install): imported in the block, executed on first use only."""
    (tmp_path / "heavy_module.py").write_text("import sys\nsys.executed = True\nVALUE = 42\n")
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from intu_dicom_destination.shared.imports import deferred_imports\n"
        "with deferred_imports('heavy_module', 'not_installed_anywhere'):\n"
        "    import heavy_module\n"
        "    try:\n"
        "        import not_installed_anywhere\n"
        "    except ImportError:\n"
        "        pass\n"
        "assert not hasattr(sys, 'executed')\n"
        "assert heavy_module.VALUE == 42 and sys.executed\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_the_registered_types_parse_with_the_settings_parsers_and_create_the_real_objects(
    tmp_path: Path,
) -> None:
    from intu_dicom_destination.scp.source import DicomSource
    from intu_dicom_destination.scu.destination import DicomDestination

    assert DESTINATION_TYPE.name == SOURCE_TYPE.name == "dicom"
    assert DESTINATION_TYPE.parse_settings is parse_destination_settings
    assert SOURCE_TYPE.parse_settings is parse_source_settings
    runtime = Runtime(name="pacs", data_dir=tmp_path / "data", logger=logging.getLogger("test"))
    destination = DESTINATION_TYPE.create(
        DestinationSettings(host="127.0.0.1", called_ae_title="PACS"), runtime
    )
    try:
        assert isinstance(destination, DicomDestination)
    finally:
        destination.close()
    source = SOURCE_TYPE.create(SourceSettings(port=free_port()), runtime)
    assert isinstance(source, DicomSource)
