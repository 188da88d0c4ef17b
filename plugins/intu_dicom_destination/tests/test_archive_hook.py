"""The `file` destination writes DICOM bodies as Part-10 files through the plugin's hook."""

from __future__ import annotations

import intu_dicom_destination
import pytest
from intu_dicom_destination.body import body_from_file, scan_file
from intu_dicom_destination.testing import write_ct_series
from pydicom import dcmread

from intu_core.message import Message


@pytest.mark.parametrize("read", [body_from_file, lambda path: scan_file(path).body()])
def test_a_dicom_body_is_archived_as_uid_dcm(tmp_path, read):
    """With its model, and as the source hands it over when no stage reads it (no model)."""
    (original,) = write_ct_series(tmp_path / "in", 1, size_kib=16)
    body = read(original)
    path = intu_dicom_destination.intu_write_message_file(Message(body=body), tmp_path / "archive")
    assert path == tmp_path / "archive" / f"{body['sop_instance_uid']}.dcm"
    assert path.read_bytes() == original.read_bytes()  # unchanged: the stored bytes, untouched


def test_a_sender_chosen_uid_cannot_name_a_path_outside_the_archive(tmp_path):
    (original,) = write_ct_series(tmp_path / "in", 1, size_kib=16)
    body = {**body_from_file(original), "sop_instance_uid": "../../escaped"}
    message = Message(body=body)
    path = intu_dicom_destination.intu_write_message_file(message, tmp_path / "archive")
    assert path == tmp_path / "archive" / f"{message.id}.dcm"
    assert not (tmp_path / "escaped.dcm").exists()
    assert dcmread(path).SOPInstanceUID == dcmread(original).SOPInstanceUID


def test_other_bodies_are_left_to_other_writers(tmp_path):
    assert intu_dicom_destination.intu_write_message_file(Message(body={"a": 1}), tmp_path) is None
