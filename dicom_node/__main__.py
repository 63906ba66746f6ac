"""`python -m dicom_node` = `ctmtl-node`."""

from dicom_node.cli import main

raise SystemExit(main())
