"""The systemd unit and the container definition in ``deploy/``: what can be checked without
systemd or a container engine running (``systemd-analyze verify`` when it is installed, the keys
that matter, COPY sources that exist, and command lines that ``intu`` accepts)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from intu_core.cli import cli
from intu_core.logfmt import FORMATS

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "intu.service"
CONTAINERFILE = REPO / "deploy" / "Containerfile"


def unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    """``section -> key -> values`` of a systemd unit (a key may be given several times)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"a key before any section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Containerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def assert_valid_intu_command_line(args: list[str]) -> None:
    """``intu ARGS`` parses (options and commands ``intu --help`` shows): its ``--help`` works."""
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, (args, result.output)
    assert "Run every enabled channel" in result.output  # serve's own help, not the group's


def test_the_systemd_unit_runs_serve_as_its_own_user_with_the_data_in_var_lib_intu() -> None:
    keys = unit_keys(UNIT.read_text())
    service = {k: v[-1] for k, v in keys["Service"].items()}
    assert service["Type"] in ("simple", "notify")
    assert service["User"] == "intu" and service["Group"] == "intu"
    binary, *args = shlex.split(service["ExecStart"])
    assert Path(binary).name == "intu" and args == ["--dir", "/etc/intu", "serve"]
    assert_valid_intu_command_line(args)
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "intu" and service["StateDirectoryMode"] == "0700"
    assert service["ProtectSystem"] == "strict" and service["ReadWritePaths"] == "/var/lib/intu"
    assert service["NoNewPrivileges"] == "true" and service["KillSignal"] == "SIGTERM"
    # A graceful stop takes up to 10 s (associations) + 30 s (in-flight sends): room for both.
    assert int(service["TimeoutStopSec"].removesuffix("s")) >= 60
    assert keys["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_analyze_verifies_the_unit(tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit's keys are checked above)")
    # The unit names intu where the guide installs it; verify checks that the binary exists.
    here = shutil.which("intu") or sys.executable
    unit = tmp_path / "intu.service"
    unit.write_text(UNIT.read_text().replace("/opt/intu/bin/intu", here))
    run = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr  # unknown keys are only warnings


def test_the_containerfile_installs_every_distribution_from_the_repository_as_a_non_root_user() -> None:
    steps = instructions(CONTAINERFILE.read_text())
    assert steps[0] == ("FROM", "python:3.11-slim")
    copied = []
    for word, args in steps:
        if word == "COPY":
            *sources, _target = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                copied.append(source)
    distributions = {p.parent.relative_to(REPO).as_posix() for p in REPO.glob("plugins/*/pyproject.toml")}
    assert distributions and distributions <= set(copied), distributions - set(copied)
    [install] = [args for word, args in steps if word == "RUN" and "pip install" in args]
    for folder in distributions:
        assert f"/src/{folder}" in install.split(), folder
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("VOLUME", "/var/lib/intu") in steps
    exposed = {port for word, args in steps if word == "EXPOSE" for port in args.split()}
    assert {"104", "11112", "8080"} <= exposed
    [health] = [args for word, args in steps if word == "HEALTHCHECK"]
    assert "/healthz" in health and "8080" in health
    env = " ".join(args for word, args in steps if word == "ENV")
    assert (m := re.search(r"INTU_LOG_FORMAT=(\w+)", env)) and m.group(1) in FORMATS


def test_the_container_runs_a_valid_intu_command_line() -> None:
    steps = dict(instructions(CONTAINERFILE.read_text()))
    entrypoint, command = json.loads(steps["ENTRYPOINT"]), json.loads(steps["CMD"])
    assert entrypoint == ["intu"] and command == ["--dir", "/etc/intu", "serve"]
    assert_valid_intu_command_line(command)


def test_the_build_context_leaves_out_build_leftovers() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"**/build", "**/*.egg-info", ".git"} <= set(ignored)
