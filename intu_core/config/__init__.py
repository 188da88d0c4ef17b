"""Configuration: YAML with line marks, ${VAR} substitution and path-shaped errors."""

from intu_core.config.problems import ConfigError, Problem, Problems
from intu_core.config.section import REQUIRED, Section

__all__ = ["REQUIRED", "ConfigError", "Problem", "Problems", "Section"]
