"""Test SCUs built on pynetdicom send against a source that now answers within microseconds;
pynetdicom's requestor has a race in pausing its reactor that such fast answers expose (see
``internals.pause_reactor``): every ``send_c_store`` of the tests waits for a truly paused reactor
first. intu's own SCU parks its reactor and is not affected."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from intu_dicom_destination import internals
from pynetdicom.association import Association


@pytest.fixture(autouse=True)
def _c_store_waits_for_a_paused_reactor(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    send = Association.send_c_store

    def send_c_store(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.is_established and self.is_requestor:
            internals.pause_reactor(self)
        return send(self, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", send_c_store)
    yield
