"""Configuration problems: what is wrong, in which file, at which key path and line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One configuration error: ``file:line: key.path: what was expected, what was found``."""

    file: Path
    key_path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else f"{self.file}"
        at = f" {self.key_path}:" if self.key_path else ""
        return f"{where}:{at} {self.message}"


@dataclass
class Problems:
    """Collects problems so that every error is reported at once."""

    items: list[Problem] = field(default_factory=list)

    def add(self, problem: Problem) -> None:
        self.items.append(problem)

    def add_text(self, file: Path, key_path: str, message: str, line: int | None = None) -> None:
        self.items.append(Problem(file, key_path, message, line))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class ConfigError(Exception):
    """Raised when a project's configuration has problems; ``problems`` lists them all."""

    def __init__(self, problems: Problems | list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def report(self) -> str:
        """Every problem, one per line, under a count: what `intu validate` prints."""
        lines = [f"{len(self.problems)} configuration error(s):"]
        return "\n".join(lines + [f"  {p}" for p in self.problems])
