#!/usr/bin/env bash
# Install intu, its DICOM plugin and the test tools, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet -e ".[test]" -e ./plugins/intu_dicom_destination -e ./plugins/intu_postgres_queue \
  -e "./plugins/intu_http[test]"
python3 -m pytest -q "$@"
