#!/usr/bin/env bash
# Look at the node's results by hand in OHIF, on this host only: starts Orthanc from a temp
# folder (DICOMweb plugin only, no DICOM port, HTTP refused from other hosts) and the pinned
# OHIF viewer on 127.0.0.1, uploads the DICOM files under the given folders (a CT series and
# the SEG / SR / SC the node wrote for it), prints the viewer URL of each study and stops
# both on Ctrl-C. From another machine: ssh -L 9042:127.0.0.1:9042 this-host.
# Needs Debian orthanc + orthanc-dicomweb, and npm the first time (the viewer is fetched once
# into ~/.cache/ctmtl/ohif, or CTMTL_OHIF_CACHE). Options: --port N, --cache DIR.
#   bash scripts/viewer.sh ../shared/data/dicom/ricord-1a-covid-chest-ct results/
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY=python3
[ -x "$here/../.venv/bin/python" ] && PY="$here/../.venv/bin/python"
exec "$PY" "$here/ohif_viewer.py" "$@"
