"""Log lines people and log shippers can use: ``--log-format json|text`` and the identifiers of the
message a line is about (``intu_core.logfmt``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from click.testing import CliRunner

from intu_core.cli import cli
from intu_core.delivery import DeliveryWorkers, RetryPolicy
from intu_core.logfmt import JsonFormatter, TextFormatter, message_fields
from intu_core.message import Message, SendResult
from intu_core.queue.sqlite import SqliteQueueStore

IDENTIFIERS = {
    "patient_id": "P-1",
    "accession_number": "ACC-42",
    "study_uid": "1.2.826.0.1.3680043.8.498.1",
    "sop_instance_uid": "1.2.826.0.1.3680043.8.498.2",
}


def dicom_message(**identifiers: str) -> Message:
    history = {"source": "CT@127.0.0.1:4000", "identifiers": identifiers or IDENTIFIERS, "tags": {}}
    return Message(body={"n": 1}, channel="ct", metadata={"history": history})


def record(msg: str, *, extra: dict[str, object] | None = None, exc: bool = False) -> logging.LogRecord:
    logger = logging.getLogger("intu.test.logfmt")
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), exc_info, extra=extra)


def test_message_fields_carry_the_accession_and_study_but_not_the_patient() -> None:
    message = dicom_message()
    fields = message_fields(message)
    assert fields == {
        "message_id": message.id,
        "accession_number": "ACC-42",
        "study_uid": "1.2.826.0.1.3680043.8.498.1",
    }
    # A message without history (another source type) still names itself; absent keys are left out.
    assert message_fields(Message(body={})).keys() == {"message_id"}
    assert message_fields(dicom_message(study_uid="1.2.3")).keys() == {"message_id", "study_uid"}
    assert message_fields(Message(body={}, metadata={"history": "not a mapping"})).keys() == {"message_id"}


def test_json_lines_have_time_level_logger_message_and_the_structured_fields() -> None:
    line = JsonFormatter().format(record("message x queued", extra=message_fields(dicom_message())))
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "WARNING" and data["logger"] == "intu.test.logfmt"
    assert data["message"] == "message x queued"
    assert data["accession_number"] == "ACC-42" and data["study_uid"].startswith("1.2.826")
    assert data["time"].endswith("Z") and len(data["time"]) == len("2026-12-03T10:00:00.123Z")
    assert "patient_id" not in data


def test_json_keeps_the_traceback_in_one_line_and_survives_fields_that_are_not_json() -> None:
    data = json.loads(JsonFormatter().format(record("failed", extra={"path": Path("/x")}, exc=True)))
    assert data["path"] == "/x"
    assert "ValueError: boom" in data["exception"] and "Traceback" in data["exception"]


def test_text_lines_end_with_the_identifiers_before_any_traceback() -> None:
    text = TextFormatter().format(record("message x filtered", extra=message_fields(dicom_message())))
    assert text.endswith(
        "intu.test.logfmt: message x filtered [acc=ACC-42 study=1.2.826.0.1.3680043.8.498.1]"
    )
    plain = TextFormatter().format(record("engine stopped"))
    assert plain.endswith("intu.test.logfmt: engine stopped")
    with_traceback = TextFormatter().format(record("failed", extra={"accession_number": "A"}, exc=True))
    first, rest = with_traceback.split("\n", 1)
    assert first.endswith("failed [acc=A]") and rest.startswith("Traceback")


def test_delivery_lines_about_a_message_carry_its_identifiers(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="intu")
    store = SqliteQueueStore(tmp_path)

    class Refusing:
        def send(self, message: Message) -> SendResult:
            return SendResult.permanent("refused", code=0xC000)

        def close(self) -> None:
            pass

    store.enqueue([("pacs", dicom_message())])
    workers = DeliveryWorkers(
        store, "pacs", Refusing(), RetryPolicy(), 1, logging.getLogger("intu.delivery.pacs")
    )
    workers.start()
    try:
        deadline = time.monotonic() + 10
        while workers.counts["dead"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        workers.stop(5)
        store.close()
    [dead] = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert dead.accession_number == "ACC-42"  # type: ignore[attr-defined]
    assert dead.study_uid == IDENTIFIERS["study_uid"]  # type: ignore[attr-defined]


def test_the_command_line_takes_a_log_format() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert "--log-format [text|json]" in result.output
    assert CliRunner().invoke(cli, ["--log-format", "xml", "plugins"]).exit_code == 2


def test_log_format_json_makes_every_line_a_json_object(tmp_path) -> None:
    # A process of its own: under pytest the root logger has handlers already (as under any host
    # that configured logging), and then intu leaves them alone.
    script = textwrap.dedent(
        """
        import logging, sys
        from intu_core.cli import cli
        from intu_core.logfmt import message_fields
        from intu_core.message import Message

        cli(sys.argv[1:], standalone_mode=False)
        message = Message(body={}, metadata={"history": {"identifiers": {"accession_number": "A1"}}})
        logging.getLogger("intu.engine").warning("hello %s", "world", extra=message_fields(message))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, "--log-format", "json", "plugins"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    [line] = [json.loads(x) for x in run.stderr.splitlines() if x.strip()]
    assert line["message"] == "hello world" and line["accession_number"] == "A1"
    assert line["logger"] == "intu.engine" and line["level"] == "WARNING"
