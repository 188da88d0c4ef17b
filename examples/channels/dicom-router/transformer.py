"""The seed's transformer (its transformer.ts), in Python: log the study, then enrich two tags.

It is the channel's transformer (picked up by convention as transformer.py), so it runs once per
received instance, before the message is queued for hospital-pacs.

``msg.body["dataset"]`` is the DICOM JSON model (keys are tags as 8 hex digits); pixel data is a
bulk-data reference and passes through untouched.
"""


def _first(dataset, tag, default=""):
    values = (dataset.get(tag) or {}).get("Value") or [default]
    return values[0]


def transform(msg, ctx):
    dicom_data = msg.body
    dataset = dicom_data.get("dataset") or {}

    patient_id = _first(dataset, "00100020")
    patient_name = (_first(dataset, "00100010", {}) or {}).get("Alphabetic", "")  # read, as the seed does
    modality = _first(dataset, "00080060")
    study_uid = _first(dataset, "0020000D")

    ctx.logger.info(f"Routing {modality} study {study_uid} for patient {patient_id}")
    del patient_name  # not logged: a name in a log line is PHI in the wrong place

    enriched_dataset = {
        **dataset,
        "00081090": {"vr": "LO", "Value": ["INTU_PROCESSED"]},
        "00080080": {"vr": "LO", "Value": [_first(dataset, "00080080", "General Hospital")]},
    }
    return msg.replace(body={**dicom_data, "dataset": enriched_dataset})
