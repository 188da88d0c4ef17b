"""Reading one block of configuration, reporting every problem with where it is.

Plugins parse their own settings with a ``Section``: each getter returns the value (or a
default) and records a ``Problem`` naming the file, the key path and the line when the value is
missing or wrong, so that ``intu validate`` can report every error at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from intu_core.config.problems import Problem, Problems
from intu_core.config.yamlfile import line_of

T = TypeVar("T")
# Section has methods named str/int/float/bool; these aliases keep annotations unambiguous.
Text = str
Integer = int
Number = float
Flag = bool


class _Missing:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Missing()


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return repr(value)


class Section:
    """A mapping of settings at a key path in a file, with typed getters."""

    def __init__(
        self,
        data: Any,
        *,
        file: Path,
        path: str,
        problems: Problems,
        line: int | None = None,
    ) -> None:
        self.file = file
        self.where = path  # the key path of this section, e.g. "destinations.pacs.dicom"
        self.problems = problems
        self.line = line if line is not None else line_of(data)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            self.error(None, f"expected a mapping of settings, found {_describe(data)}")
            data = {}
        self.data: Mapping[str, Any] = data
        self._read: set[str] = set()

    # -- reporting -------------------------------------------------------------------------
    def key_path(self, key: str | None) -> str:
        if key is None:
            return self.where
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str | None, message: str) -> None:
        """Record a problem at ``key`` (or at this section itself when ``key`` is None)."""
        line = line_of(self.data, key) if key is not None else self.line
        self.problems.add(Problem(self.file, self.key_path(key), message, line or self.line))

    @property
    def base_dir(self) -> Path:
        return self.file.parent

    # -- getters ---------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        self._read.add(key)
        return self.data.get(key, default)

    def _value(self, key: str, default: Any) -> tuple[bool, Any]:
        self._read.add(key)
        if key not in self.data or self.data[key] is None:
            if default is REQUIRED:
                self.error(None, f"missing required key '{key}'")
                return False, None
            return False, default
        return True, self.data[key]

    def str(
        self,
        key: Text,
        default: Any = REQUIRED,
        *,
        choices: Iterable[Text] | None = None,
        max_length: Integer | None = None,
    ) -> Any:
        found, value = self._value(key, default)
        if not found:
            return value
        if isinstance(value, Flag) or isinstance(value, (Mapping, list)):
            self.error(key, f"expected a string, found {_describe(value)}")
            return default if default is not REQUIRED else None
        value = str(value)
        if choices is not None:
            options = list(choices)
            if value not in options:
                hint = did_you_mean(value, options)
                self.error(key, f"expected one of {', '.join(options)}, found {value!r}{hint}")
                return default if default is not REQUIRED else None
        if max_length is not None and len(value) > max_length:
            self.error(key, f"expected at most {max_length} characters, found {len(value)} ({value!r})")
        return value

    def int(
        self,
        key: Text,
        default: Any = REQUIRED,
        *,
        min: Integer | None = None,
        max: Integer | None = None,
    ) -> Any:
        found, value = self._value(key, default)
        if not found:
            return value
        # A ${VAR} substitution yields a string; accept digits from it.
        if isinstance(value, Text) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, Flag) or not isinstance(value, Integer):
            self.error(key, f"expected {_range_text(min, max)}, found {_describe(value)}")
            return default if default is not REQUIRED else None
        if (min is not None and value < min) or (max is not None and value > max):
            self.error(key, f"expected {_range_text(min, max)}, found {value}")
            return default if default is not REQUIRED else None
        return value

    def float(self, key: Text, default: Any = REQUIRED, *, min: Number | None = None) -> Any:
        found, value = self._value(key, default)
        if not found:
            return value
        if isinstance(value, Text):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, Flag) or not isinstance(value, (Integer, Number)):
            self.error(key, f"expected a number, found {_describe(value)}")
            return default if default is not REQUIRED else None
        if min is not None and value < min:
            self.error(key, f"expected a number of at least {min}, found {value}")
        return float(value)

    def bool(self, key: Text, default: Any = REQUIRED) -> Any:
        found, value = self._value(key, default)
        if not found:
            return value
        if isinstance(value, Text) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, Flag):
            self.error(key, f"expected true or false, found {_describe(value)}")
            return default if default is not REQUIRED else None
        return value

    def str_list(self, key: Text, default: Any = REQUIRED) -> Any:
        found, value = self._value(key, default)
        if not found:
            return value
        if isinstance(value, Text):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, (Text, Integer)) for v in value):
            self.error(key, f"expected a list of strings, found {_describe(value)}")
            return default if default is not REQUIRED else None
        return [str(v) for v in value]

    def path(self, key: Text, default: Any = REQUIRED, *, must_exist: Flag = True) -> Any:
        """A file path; relative paths are taken from the folder of the file that holds it."""
        value = self.str(key, default)
        if value is None or value is default:
            return value
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        if must_exist and not path.exists():
            self.error(key, f"expected an existing file, found {value!r} (no such file: {path})")
        return path

    def section(self, key: Text) -> Section:
        """The nested mapping at ``key`` (an empty one when the key is absent)."""
        self._read.add(key)
        value = self.data.get(key)
        return Section(
            value,
            file=self.file,
            path=self.key_path(key),
            problems=self.problems,
            line=line_of(self.data, key) or self.line,
        )

    def done(self, also_allowed: Iterable[Text] = ()) -> None:
        """Report every key that no getter read as unknown, with a "did you mean" hint."""
        known = self._read | set(also_allowed)
        for key in self.data:
            if key not in known:
                hint = did_you_mean(str(key), sorted(known))
                self.error(key, f"unknown key '{key}'{hint}")


def did_you_mean(value: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _range_text(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"an integer from {low} to {high}"
    if low is not None:
        return f"an integer of at least {low}"
    if high is not None:
        return f"an integer of at most {high}"
    return "an integer"
