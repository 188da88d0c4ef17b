"""The plugin contract is documented: every hook has a docstring and a section in docs/plugins.md."""

from __future__ import annotations

import inspect
from pathlib import Path

import intu_core
from intu_core import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("intu_")]


def test_there_are_hooks():
    assert {"intu_destination_types", "intu_source_types", "intu_cli_commands"} <= set(HOOKS)


def test_every_hook_has_a_docstring_with_since_and_type_hints():
    for name in HOOKS:
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and "Since" in fn.__doc__, f"{name} needs a docstring saying since when it exists"
        assert "return" in fn.__annotations__, f"{name} needs a return type"


def test_every_hook_is_documented_for_plugin_authors():
    text = DOCS.read_text()
    for name in HOOKS:
        assert f"`{name}`" in text, f"docs/plugins.md does not document {name}"


def test_the_public_api_is_documented():
    for name in intu_core.__all__:
        obj = getattr(intu_core, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"intu_core.{name} has no docstring"
