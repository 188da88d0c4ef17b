"""YAML files whose mappings remember the line of each key, with ${VAR} substitution."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from intu_core.config.problems import Problem, Problems


class MarkedDict(dict):  # type: ignore[type-arg]
    """A dict that knows the line of the mapping and of each of its keys (1-based)."""

    line: int | None = None
    key_lines: dict[Any, int]


def line_of(data: Any, key: Any = None) -> int | None:
    if not isinstance(data, MarkedDict):
        return None
    if key is None:
        return data.line
    return data.key_lines.get(key, data.line)


class _MarkedLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _MarkedLoader, node: yaml.MappingNode) -> MarkedDict:
    loader.flatten_mapping(node)
    result = MarkedDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


_MarkedLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a ``.env`` file (comments and blank lines skipped, quotes removed)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load_yaml(path: Path, problems: Problems, env: Mapping[str, str] | None = None) -> Any:
    """Load ``path``; report syntax errors and unset ${VAR}s to ``problems``.

    ``env`` defaults to the process environment; ``${VAR:-default}`` gives a fallback.
    Returns ``None`` when the file cannot be read or parsed.
    """
    if env is None:
        env = os.environ
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.add(Problem(path, "", f"cannot read the file: {exc.strerror or exc}"))
        return None
    try:
        data = yaml.load(text, Loader=_MarkedLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        problems.add(Problem(path, "", f"invalid YAML: {reason}", line))
        return None
    return _substitute(data, path, "", env, problems, None)


def _substitute(
    value: Any, path: Path, key_path: str, env: Mapping[str, str], problems: Problems, line: int | None
) -> Any:
    if isinstance(value, MarkedDict):
        for key in list(value):
            child_path = f"{key_path}.{key}" if key_path else str(key)
            value[key] = _substitute(value[key], path, child_path, env, problems, line_of(value, key))
        return value
    if isinstance(value, list):
        return [_substitute(v, path, f"{key_path}[{i}]", env, problems, line) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def replace(match: re.Match[str]) -> str:
            name, fallback = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if fallback is not None:
                return fallback
            problems.add(
                Problem(
                    path,
                    key_path,
                    f"environment variable '{name}' is not set (set it, add it to .env, "
                    f"or give a default with ${{{name}:-value}})",
                    line,
                )
            )
            return ""

        return _VAR.sub(replace, value)
    return value
