"""Parsing the `dicom` destination block: the seed's examples and every kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
from intu_dicom_destination.scu.settings import DestinationSettings, parse_destination_settings

from intu_core.config.problems import Problems
from intu_core.config.section import Section
from intu_core.config.yamlfile import load_yaml

SEED = """\
destinations:
  pacs-archive:
    type: dicom
    dicom:
      host: pacs.radiology.hospital.org
      port: 11112
      ae_title: INTU_SCU
      called_ae_title: PACS_SCP
      timeout_ms: 60000
      tls:
        enabled: true
        ca_cert: {ca}
  hospital-pacs:
    type: dicom
    dicom:
      host: pacs.radiology.hospital.org
      port: 11112
      ae_title: INTU_ROUTER
      called_ae_title: MAIN_PACS
      timeout_ms: 120000
      max_pdu_length: 65536
      tls:
        enabled: true
        ca_cert: {ca}
        client_cert: {cert}
        client_key: {key}
"""


def parse(tmp_path: Path, text: str, name: str = "d") -> tuple[DestinationSettings, Problems]:
    file = tmp_path / "intu.yaml"
    file.write_text(text)
    problems = Problems()
    data = load_yaml(file, problems)
    block = data["destinations"][name]
    section = Section(block["dicom"], file=file, path=f"destinations.{name}.dicom", problems=problems)
    return parse_destination_settings(section), problems


def one(text: str) -> str:
    return "destinations:\n  d:\n    type: dicom\n    dicom:\n" + "".join(
        f"      {line}\n" for line in text.strip().splitlines()
    )


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("ca", "cert", "key"):
        out[name] = tmp_path / f"{name}.pem"
        out[name].write_text("PEM")
    return out


def test_seed_examples_parse(tmp_path, certs):
    text = SEED.format(**certs)
    archive, problems = parse(tmp_path, text, "pacs-archive")
    assert not problems, [str(p) for p in problems]
    assert archive.host == "pacs.radiology.hospital.org" and archive.port == 11112
    assert archive.ae_title == "INTU_SCU" and archive.called_ae_title == "PACS_SCP"
    assert archive.timeout_ms == 60000 and archive.max_pdu_length == 16384
    assert archive.tls.enabled and archive.tls.ca_cert == certs["ca"] and archive.tls.client_cert is None
    hospital, problems = parse(tmp_path, text, "hospital-pacs")
    assert not problems
    assert hospital.ae_title == "INTU_ROUTER" and hospital.max_pdu_length == 65536
    assert hospital.tls.client_cert == certs["cert"] and hospital.tls.client_key == certs["key"]
    assert (
        hospital.max_associations == 2 and hospital.idle_timeout_ms == 5000 and hospital.duplicate_is_success
    )


def test_defaults(tmp_path):
    settings, problems = parse(tmp_path, one("host: pacs\ncalled_ae_title: PACS"))
    assert not problems
    assert settings == DestinationSettings(host="pacs", called_ae_title="PACS")
    assert settings.port == 104 and settings.ae_title == "INTU_SCU" and not settings.tls.enabled


@pytest.mark.parametrize(
    ("body", "key", "line", "words"),
    [
        (
            "host: pacs\ncalled_ae_title: PACS\nport: 70000",
            "port",
            7,
            "expected an integer from 1 to 65535, found 70000",
        ),
        ("host: pacs\ncalled_ae_title: PACS\nport: abc", "port", 7, "found 'abc'"),
        (
            "host: pacs\ncalled_ae_title: A_VERY_LONG_AE_TITLE",
            "called_ae_title",
            6,
            "at most 16 characters, found 20",
        ),
        ("host: pacs\ncalled_ae_title: PACS\nae_title: 'A\\\\B'", "ae_title", 7, "without a backslash"),
        ("host: pacs\ncalled_ae_title: '   '", "called_ae_title", 6, "only spaces"),
        ("called_ae_title: PACS", "", 5, "missing required key 'host'"),
        ("host: pacs", "", 5, "missing required key 'called_ae_title'"),
        (
            "host: pacs\ncalled_ae_title: PACS\nmax_pdu_lenght: 1",
            "max_pdu_lenght",
            7,
            "did you mean 'max_pdu_length'",
        ),
        ("host: pacs\ncalled_ae_title: PACS\ntls:\n  enabled: true", "tls", 7, "expected tls.ca_cert"),
        (
            "host: pacs\ncalled_ae_title: PACS\ntls:\n  enabled: true\n  ca_cert: nope.pem",
            "tls.ca_cert",
            9,
            "no such file",
        ),
        (
            "host: pacs\ncalled_ae_title: PACS\ntls:\n  enabeld: true",
            "tls.enabeld",
            8,
            "did you mean 'enabled'",
        ),
    ],
)
def test_problems_name_file_key_line_and_what_was_found(tmp_path, body, key, line, words):
    _, problems = parse(tmp_path, one(body))
    assert len(problems) == 1, [str(p) for p in problems]
    problem = problems.items[0]
    assert problem.file == tmp_path / "intu.yaml"
    assert problem.key_path == "destinations.d.dicom" + (f".{key}" if key else "")
    assert problem.line == line
    assert words in problem.message, problem.message


def test_client_cert_and_key_go_together(tmp_path, certs):
    _, problems = parse(
        tmp_path,
        one(
            f"host: pacs\ncalled_ae_title: PACS\ntls:\n  enabled: true\n  ca_cert: {certs['ca']}\n"
            f"  client_cert: {certs['cert']}"
        ),
    )
    assert [p.key_path for p in problems] == ["destinations.d.dicom.tls.client_cert"]
    assert "client_key" in problems.items[0].message
    _, problems = parse(
        tmp_path, one(f"host: pacs\ncalled_ae_title: PACS\ntls:\n  client_key: {certs['key']}")
    )
    assert [p.key_path for p in problems] == ["destinations.d.dicom.tls.client_key"]


def test_relative_cert_paths_are_taken_from_the_config_folder(tmp_path, certs):
    settings, problems = parse(
        tmp_path, one("host: pacs\ncalled_ae_title: PACS\ntls:\n  enabled: true\n  ca_cert: ca.pem")
    )
    assert not problems and settings.tls.ca_cert == tmp_path / "ca.pem"


def test_tls_files_are_checked_only_when_tls_is_enabled(tmp_path):
    # Disabled, the block may keep paths that do not exist here (yet); the source does the same.
    missing = "tls:\n  {enabled}ca_cert: nope-ca.pem\n  client_cert: nope.pem\n  client_key: nope.key"
    settings, problems = parse(
        tmp_path, one("host: pacs\ncalled_ae_title: PACS\n" + missing.format(enabled="enabled: false\n  "))
    )
    assert not problems, [str(p) for p in problems]
    assert not settings.tls.enabled and settings.tls.ca_cert == tmp_path / "nope-ca.pem"
    _, problems = parse(tmp_path, one("host: pacs\ncalled_ae_title: PACS\n" + missing.format(enabled="")))
    assert not problems, [str(p) for p in problems]
    (tmp_path / "a-folder.pem").mkdir()
    _, problems = parse(
        tmp_path, one("host: pacs\ncalled_ae_title: PACS\ntls:\n  enabled: false\n  ca_cert: a-folder.pem")
    )
    assert not problems, [str(p) for p in problems]
    _, problems = parse(
        tmp_path, one("host: pacs\ncalled_ae_title: PACS\n" + missing.format(enabled="enabled: true\n  "))
    )
    assert sorted(p.key_path.rpartition(".")[2] for p in problems) == ["ca_cert", "client_cert", "client_key"]
    assert all("no such file" in p.message for p in problems)
