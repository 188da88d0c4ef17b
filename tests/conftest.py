"""Shared fixtures for engine tests."""

from __future__ import annotations

import sys

import pytest

# The queue contract's asserts live in a library module: have pytest explain them as in a test.
pytest.register_assert_rewrite("intu_core.testing.queue_contract")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path where tests 'install' plugins."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in list(sys.modules):
        if name.startswith("fakeplugin_"):
            del sys.modules[name]
