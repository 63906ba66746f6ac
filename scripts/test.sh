#!/usr/bin/env bash
# Installs what the tests need on a fresh machine (Debian packages for the real DICOM peers,
# validators, PostgreSQL, and Orthanc's DICOMweb plugin + chromium for the OHIF viewer test;
# npm where missing, which fetches the pinned OHIF once; the Python environment, with
# Playwright), then runs lint, types and all tests.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k orthanc`).
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES="orthanc orthanc-dicomweb socat chromium dcmtk dicom3tools postgresql systemd openssl"
# npm may come with a nodejs of another origin: Debian's npm only where there is none
command -v npm >/dev/null 2>&1 || APT_PACKAGES="$APT_PACKAGES npm"
missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing Debian packages:$missing"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi
bash scripts/setup.sh --dev
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest -ra --durations=15 "$@"
